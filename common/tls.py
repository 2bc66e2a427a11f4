"""Mutual TLS between pdserve's components: every gRPC server and channel between them goes through here.

With ``TlsConfig`` empty (the default) servers listen in plaintext and channels dial in plaintext,
as on a laptop. With a certificate, key and CA set (``PDSERVE_TLS_CERT`` / ``_KEY`` / ``_CA``, which
the Helm chart sets from a mounted Secret when ``mtls.enabled``), every server demands a client
certificate that chains to the CA and every channel presents this process's certificate and
checks the server's against the same CA. Workers are dialled by pod IP, so ``server_name``
(``PDSERVE_TLS_SERVER_NAME``) names the DNS name the peer's certificate must hold instead of the
dialled address.

Certificates rotate (cert-manager renews them in place): servers re-read the files when they change
(gRPC's dynamic server credentials ask on every handshake; the files are stat'ed at most once a
second), and :func:`client_credentials` is cached by the files' modification times, so a channel
opened after a renewal presents the new certificate. Long-lived channels keep their handshake's
certificate until they reconnect, which is fine for as long as the old one is valid (cert-manager
renews well before expiry).

What TLS does not cover: the router's public HTTP and gRPC API (terminate TLS at the ingress, and
use API keys), worker ``/metrics`` (Prometheus scrapes it on its own port) and the NCCL data path
of the ``nccl`` KV transport (its control messages travel over the mTLS gRPC stream; the tensors go
over the GPU fabric).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import ConfigError

logger = logging.getLogger(__name__)

ChannelOptions = Sequence[tuple[str, object]]


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS between components (all three of cert, key and ca, or none)."""

    cert: str = ""
    """PEM certificate chain this process presents, as server and as client."""
    key: str = ""
    """PEM private key of ``cert``."""
    ca: str = ""
    """PEM CA bundle every peer's certificate must chain to."""
    server_name: str = ""
    """DNS name the servers' certificates are checked against (peers are dialled by IP); empty: the
    dialled host."""

    def __post_init__(self) -> None:
        given = [name for name in ("cert", "key", "ca") if getattr(self, name)]
        if given and len(given) != 3:
            missing = sorted({"cert", "key", "ca"} - set(given))
            raise ConfigError(f"mutual TLS needs cert, key and ca; {', '.join(missing)} not set",
                              field=missing[0])
        for name in given:
            if not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{getattr(self, name)} is not a readable file", field=name)
        if self.server_name and not given:
            raise ConfigError("set cert, key and ca too (server_name alone does nothing)", field="server_name")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _mtimes(tls: TlsConfig) -> tuple[int, ...]:
    return tuple(os.stat(p).st_mtime_ns for p in (tls.cert, tls.key, tls.ca))


# --- servers ----------------------------------------------------------------------------------------


class _ServerCertificates:
    """The fetcher behind dynamic server credentials: a new configuration when the files change."""

    CHECK_EVERY_S = 1.0

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._mtimes = _mtimes(tls)
        self._checked_at = time.monotonic()

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        tls = self.tls
        return grpc.ssl_server_certificate_configuration([(_read(tls.key), _read(tls.cert))],
                                                         root_certificates=_read(tls.ca))

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.CHECK_EVERY_S:
                return None
            self._checked_at = now
            try:
                mtimes = _mtimes(self.tls)
                if mtimes == self._mtimes:
                    return None
                config = self.configuration()
            except OSError as e:  # mid-rotation (a Secret volume swaps a symlink): keep the old ones
                logger.warning("cannot re-read the TLS files: %s; keeping the current certificate", e)
                return None
            self._mtimes = mtimes
            logger.info("TLS certificate files changed; new handshakes use them")
            return config


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials that require a client certificate from the CA and follow certificate renewals."""
    fetcher = _ServerCertificates(tls)
    return grpc.dynamic_ssl_server_credentials(fetcher.configuration(), fetcher,
                                               require_client_authentication=True)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsConfig) -> int:
    """Bind ``address`` on ``server``, with mutual TLS when configured; returns the bound port."""
    if tls.enabled:
        return server.add_secure_port(address, server_credentials(tls))
    return server.add_insecure_port(address)


# --- channels ---------------------------------------------------------------------------------------

_client_cache: dict[tuple, grpc.ChannelCredentials] = {}
_client_lock = threading.Lock()


def client_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """This process's certificate and the CA, re-read when the files change."""
    key = (tls.cert, tls.key, tls.ca, _mtimes(tls))
    with _client_lock:
        creds = _client_cache.get(key)
        if creds is None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                                 certificate_chain=_read(tls.cert))
            _client_cache.clear()  # only the current files' credentials are worth keeping
            _client_cache[key] = creds
        return creds


def _options(tls: TlsConfig, options: ChannelOptions | None) -> list[tuple[str, object]]:
    out = list(options or ())
    if tls.enabled and tls.server_name:
        out.append(("grpc.ssl_target_name_override", tls.server_name))
    return out


def aio_channel(address: str, tls: TlsConfig, options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """An asyncio channel to another component (plaintext unless mutual TLS is configured)."""
    if tls.enabled:
        return grpc.aio.secure_channel(address, client_credentials(tls), options=_options(tls, options))
    return grpc.aio.insecure_channel(address, options=_options(tls, options))


def channel(address: str, tls: TlsConfig, options: ChannelOptions | None = None) -> grpc.Channel:
    """A blocking channel to another component (probes, command-line tools)."""
    if tls.enabled:
        return grpc.secure_channel(address, client_credentials(tls), options=_options(tls, options))
    return grpc.insecure_channel(address, options=_options(tls, options))


# --- configuration ----------------------------------------------------------------------------------


def add_tls_args(parser) -> None:  # argparse.ArgumentParser
    """``--tls-cert``, ``--tls-key``, ``--tls-ca``, ``--tls-server-name`` (or PDSERVE_TLS_*)."""
    from common.config import add_config_args

    add_config_args(parser, TlsConfig, prefix="tls_",
                    title="TlsConfig (mutual TLS between components; env PDSERVE_TLS_*)")


def load_tls(args=None) -> TlsConfig:
    """Defaults < PDSERVE_TLS_* < ``--tls-*`` flags."""
    from common.config import build_config

    return build_config(TlsConfig, args, prefix="tls_")
