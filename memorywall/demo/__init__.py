"""`memorywall demo`: an emulated wafer and GPU serving the same load, side by side.

`config` holds what a demo runs (`DemoConfig` and its defaults), `runner` starts the
servers and drives them, `report` prints what their users got.
"""
