"""TLS: the servers' certificate, gRPC's client CA (mTLS), and the shim's gRPC credentials.

Every file is read and checked when a server is built, so a missing, unreadable or
mismatched one stops start-up with a message naming its TASKNODE_* variable, rather
than surfacing later as a failed handshake.
"""

from __future__ import annotations

import ssl
from typing import NamedTuple

import grpc

from server.config import Config


class TLSError(Exception):
    """A TLS setting is incomplete, or names a file that is unreadable or not what it should be."""


class KeyPair(NamedTuple):
    """A certificate (PEM, chain allowed) and its private key (PEM, unencrypted), checked."""

    cert_file: str
    key_file: str
    cert: bytes
    key: bytes


def server_key_pair(config: Config) -> KeyPair | None:
    """The certificate both servers present; None when config serves plaintext."""
    return _key_pair(config.tls_cert_file, config.tls_key_file, "TLS")


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """gRPC's server credentials; None for plaintext. With a client CA, a caller must
    present a certificate that CA signed."""
    pair = server_key_pair(config)
    if pair is None:
        if config.tls_client_ca_file:
            raise TLSError(
                "TASKNODE_TLS_CLIENT_CA_FILE needs TASKNODE_TLS_CERT_FILE and "
                "TASKNODE_TLS_KEY_FILE: client certificates are only asked for over TLS"
            )
        return None
    ca = (
        _certificates(config.tls_client_ca_file, "TASKNODE_TLS_CLIENT_CA_FILE")
        if config.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(pair.key, pair.cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """The shim's credentials for calling gRPC; None for plaintext.

    TLS when grpc_target_ca_file is set, presenting grpc_client_cert_file when that is
    set too (for a server that requires client certificates).
    """
    client = _key_pair(config.grpc_client_cert_file, config.grpc_client_key_file, "GRPC_CLIENT")
    if not config.grpc_target_ca_file:
        if client is not None:
            raise TLSError(
                "TASKNODE_GRPC_CLIENT_CERT_FILE needs TASKNODE_GRPC_TARGET_CA_FILE: "
                "a client certificate is only sent over TLS"
            )
        return None
    return grpc.ssl_channel_credentials(
        _certificates(config.grpc_target_ca_file, "TASKNODE_GRPC_TARGET_CA_FILE"),
        client.key if client else None,
        client.cert if client else None,
    )


def _key_pair(cert_file: str, key_file: str, prefix: str) -> KeyPair | None:
    """The pair named by TASKNODE_<prefix>_CERT_FILE and _KEY_FILE; None if neither is set."""
    cert_name, key_name = f"TASKNODE_{prefix}_CERT_FILE", f"TASKNODE_{prefix}_KEY_FILE"
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        given, missing = (cert_name, key_name) if cert_file else (key_name, cert_name)
        raise TLSError(f"{given} is set but {missing} is not: set both or neither")
    cert = _certificates(cert_file, cert_name)
    key = _read(key_file, key_name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password, so that an encrypted key fails here instead of prompting for one.
        context.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"{key_name} {key_file} is not the key of {cert_file}") from None
        raise TLSError(f"{key_name} {key_file} is not an unencrypted PEM private key") from None
    return KeyPair(cert_file, key_file, cert, key)


def _certificates(path: str, name: str) -> bytes:
    """The PEM certificates in the file at path (named by the variable name), checked."""
    data = _read(path, name)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise TLSError(f"{name} {path} holds no PEM certificate") from None
    return data


def _read(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TLSError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
