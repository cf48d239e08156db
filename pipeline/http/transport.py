"""How `edgepipe serve` listens beyond its address: TLS, and whose forwarded headers it trusts.

TLS files are loaded once at start-up (`check`) so that a missing, unreadable or
mismatched certificate or key is one line naming the file and exit 2, like any other
configuration error, instead of a traceback from inside the server. An encrypted key is
refused (there is no password to give it): decrypt it, and protect it with file modes.

Behind a reverse proxy, `proxy_headers` makes the server take the client's address and
scheme from `X-Forwarded-For` / `X-Forwarded-Proto`, but only from the addresses in
`forwarded_allow_ips`; the audit log then records the client, not the proxy.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Http
from pipeline.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Transport:
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"

    @classmethod
    def from_config(cls, http: Http) -> Transport:
        return cls(http.ssl_certfile, http.ssl_keyfile, http.proxy_headers, http.forwarded_allow_ips)

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)

    def check(self) -> None:
        """Load the certificate and key as the server will; ConfigError naming the file
        when that fails."""
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("config error: http.ssl_keyfile is set without http.ssl_certfile")
        if not self.ssl_certfile:
            return
        for key, path in (("ssl_certfile", self.ssl_certfile), ("ssl_keyfile", self.ssl_keyfile)):
            if path and not Path(path).is_file():
                why = "not a file" if Path(path).exists() else "no such file"
                raise ConfigError(f"config error: http.{key}: {path}: {why}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = " and ".join(p for p in (self.ssl_certfile, self.ssl_keyfile) if p)
            raise ConfigError(
                f"config error: http.ssl_certfile/ssl_keyfile: cannot load {files}: {_why(exc)}"
            ) from None

    def uvicorn_options(self) -> dict[str, Any]:
        return {
            "ssl_certfile": self.ssl_certfile or None,
            "ssl_keyfile": self.ssl_keyfile or None,
            "proxy_headers": self.proxy_headers,
            "forwarded_allow_ips": self.forwarded_allow_ips,
        }


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the private key does not belong to the certificate"
    if isinstance(exc, ssl.SSLError):
        return "not a PEM certificate chain and its private key" + (f" ({reason})" if reason else "")
    return str(getattr(exc, "strerror", None) or exc)


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted")
