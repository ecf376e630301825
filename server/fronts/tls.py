"""TLS for both fronts from one certificate and key (PEM files), with optional client
certificates: `--tls-cert`, `--tls-key`, `--tls-client-ca`."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from memorywall.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM
    client_ca: Path | None = None  # set: clients must present a certificate signed by it

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls {name}: no such file {str(path)!r}")

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca).read_bytes() if self.client_ca is not None else None
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For aiohttp: TLS 1.2 or later, client certificates required when a CA is given."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as e:
            raise ConfigError(f"tls: cannot load {self.cert} / {self.key}: {e}") from None
        return context
