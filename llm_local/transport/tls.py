"""TLS for the gRPC server (and the `generate` client) from settings.

- no certificate configured: plain HTTP/2 (h2c), for development;
- ``tls.cert_path`` + ``tls.key_path``: TLS, ALPN ``h2`` (gRPC clients insist on it);
- plus ``tls.ca_path``: mutual TLS; a client must present a certificate signed by that
  CA, or the handshake fails (``CERT_REQUIRED``).

The Sentiric gateway dials with mTLS and verifies the server certificate against the
name ``sentiric.cloud``: the server certificate must carry ``DNS:sentiric.cloud`` in its
subjectAltName (add the host names clients use besides, e.g. ``localhost``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from llm_local.settings.schema import TLSSettings

GATEWAY_SERVER_NAME = "sentiric.cloud"


class TLSConfigError(Exception):
    """A certificate, key or CA file is missing or unusable; the message says which."""


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The SSLContext grpclib serves with, or None for plain h2c."""
    if tls.cert_path is None:
        return None
    if tls.key_path is None:
        raise TLSConfigError("tls.key_path: required when tls.cert_path is set")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.cert_path, tls.key_path, "tls.cert_path", "tls.key_path")
    if tls.ca_path is not None:
        _load_ca(context, tls.ca_path, "tls.ca_path")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


def client_ssl_context(
    ca_path: Path | None, cert_path: Path | None, key_path: Path | None
) -> ssl.SSLContext:
    """A client context: trusts `ca_path` (or the system store); presents a certificate
    when `cert_path` and `key_path` are given (mTLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_path is not None:
        _load_ca(context, ca_path, "--tls-ca")
    if cert_path is not None or key_path is not None:
        if cert_path is None or key_path is None:
            raise TLSConfigError("--tls-cert and --tls-key go together")
        _load_chain(context, cert_path, key_path, "--tls-cert", "--tls-key")
    context.set_alpn_protocols(["h2"])
    return context


def _load_chain(
    context: ssl.SSLContext, cert_path: Path, key_path: Path, cert_name: str, key_name: str
) -> None:
    _require_file(cert_path, cert_name)
    _require_file(key_path, key_name)
    try:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{cert_name} / {key_name}: cannot load the certificate and key "
            f"({cert_path}, {key_path}): {exc.reason or exc}"
        ) from None
    except OSError as exc:
        # A file the process may not read (a mounted secret with the wrong owner or
        # mode): without this, a traceback instead of the setting's name.
        raise TLSConfigError(
            f"{cert_name} / {key_name}: cannot read the certificate and key "
            f"({cert_path}, {key_path}): {exc.strerror or exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_path: Path, name: str) -> None:
    _require_file(ca_path, name)
    try:
        context.load_verify_locations(cafile=ca_path)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{name}: cannot load CA certificates from {ca_path}: {exc}") from None
    except OSError as exc:  # unreadable, as above
        raise TLSConfigError(f"{name}: cannot read {ca_path}: {exc.strerror or exc}") from None


def _require_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise TLSConfigError(f"{name}: no such file: {path}")
