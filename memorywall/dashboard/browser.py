"""Opening the page in the user's browser, only where there is a graphical one."""

from __future__ import annotations

import os
import sys
import webbrowser
from collections.abc import Mapping


def graphical(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> bool:
    """True where a window can open: macOS, Windows, or an X11/Wayland session. Elsewhere
    `webbrowser` would pick a console browser (lynx, w3m) that takes over the terminal."""
    if platform == "darwin" or platform.startswith("win"):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def open_page(url: str) -> bool:
    """Open `url` in a new tab if a graphical browser is there; True if one took it."""
    if not graphical():
        return False
    try:
        return webbrowser.open_new_tab(url)
    except webbrowser.Error:
        return False
