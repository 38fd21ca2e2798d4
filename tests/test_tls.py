"""TLS on both servers and mTLS on gRPC, with certificates made here for each test run."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.app import Server
from server.app import create_server
from server.cli import DEMO_APP
from server.cli import load_demo_if_empty
from server.config import Config
from server.gateway.app import App
from server.gateway.runner import HttpServer
from server.tls import TLSError
from server.tls import channel_credentials
from server.tls import server_credentials
from server.tls import server_key_pair
from tests.conftest import SEED_NODE
from tests.conftest import SEED_PARENT
from tests.conftest import authorized
from tests.conftest import seed_request

#: The seed request on the API gateway route, after /get_task_node_detail/10/2/.
SEED_QUERY = {
    "node_id": SEED_NODE,
    "subprocess_stack": json.dumps([SEED_PARENT]),
    "component_code": "job_fast_execute_script",
}


class Authority:
    """A CA that writes itself and the certificates it issues, valid for an hour, to a folder."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(_builder(name, self.key).issuer_name(_name(name)), ca=True)
        self.cert_file = self._write(f"{name}.pem", self.cert)

    def issue(self, name: str, server: bool = False) -> tuple[str, str]:
        """(cert file, key file) for name; a server's names 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(name, key).issuer_name(self.cert.subject)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert_file = self._write(f"{name}.pem", self._sign(builder, ca=False))
        key_file = self.folder / f"{name}.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, str(key_file)

    def _sign(self, builder: x509.CertificateBuilder, ca: bool) -> x509.Certificate:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, filename: str, cert: x509.Certificate) -> str:
        path = self.folder / filename
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(common_name: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


@dataclass(frozen=True)
class Pki:
    """The files of one run: a CA, a server and a client it signed, and a stranger's client."""

    ca: str
    server: tuple[str, str]
    client: tuple[str, str]
    stranger: tuple[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority("ca", folder)
    return Pki(
        ca=ca.cert_file,
        server=ca.issue("server", server=True),
        client=ca.issue("client"),
        stranger=Authority("other-ca", folder).issue("stranger"),
    )


@pytest.fixture
def demo(sqlite_config: Config) -> Config:
    """sqlite_config with the demo dataset: TLS does not depend on the store."""
    load_demo_if_empty(sqlite_config)
    return sqlite_config


def tls_config(config: Config, pki: Pki, mtls: bool = False) -> Config:
    """config serving TLS with the server certificate; with mtls, requiring client certificates."""
    cert, key = pki.server
    return replace(
        config, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki.ca if mtls else ""
    )


@contextmanager
def serving(config: Config) -> Iterator[Server]:
    """The gRPC server of config, started; stopped on exit."""
    server = create_server(config)
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


def credentials(pki: Pki, client: tuple[str, str] | None = None) -> grpc.ChannelCredentials:
    """Trusting pki's CA; presenting client (cert file, key file) if given."""
    cert, key = client or (None, None)
    return grpc.ssl_channel_credentials(
        Path(pki.ca).read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )


def call_seed(channel: grpc.Channel) -> str:
    """The seed request as the demo app; the reply's version."""
    stub = pb_grpc.TaskNodeServiceStub(authorized(channel))
    return stub.GetTaskNodeDetail(seed_request(), timeout=5).version


def seed_over_https(url: str, pki: Pki) -> Any:
    """The shim's answer at url to the seed request on the API gateway route, over
    HTTPS trusting pki's CA, as the demo app."""
    with httpx.Client(verify=ssl.create_default_context(cafile=pki.ca), timeout=10) as client:
        return client.get(
            f"{url}/get_task_node_detail/10/2/",
            params=SEED_QUERY,
            headers={"x-bkapi-authorization": json.dumps(DEMO_APP)},
        ).json()


def test_grpc_serves_tls_and_refuses_plaintext(demo: Config, pki: Pki) -> None:
    with serving(tls_config(demo, pki)) as server:
        target = f"127.0.0.1:{server.port}"
        with grpc.secure_channel(target, credentials(pki)) as channel:
            assert call_seed(channel)
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
            call_seed(channel)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("client", "served"), [(None, False), ("client", True), ("stranger", False)]
)
def test_mtls_serves_only_clients_the_ca_signed(
    demo: Config, pki: Pki, client: str | None, served: bool
) -> None:
    pair = getattr(pki, client) if client else None
    with (
        serving(tls_config(demo, pki, mtls=True)) as server,
        grpc.secure_channel(f"127.0.0.1:{server.port}", credentials(pki, pair)) as channel,
    ):
        if served:
            assert call_seed(channel)
        else:
            with pytest.raises(grpc.RpcError) as refused:
                call_seed(channel)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("mtls", "replicas"), [(False, 1), (True, 1), (True, 2)], ids=["tls", "mtls", "mtls-2"]
)
def test_shim_serves_https_and_calls_grpc_over_tls(
    demo: Config, pki: Pki, mtls: bool, replicas: int
) -> None:
    """With two replicas the target is a list of addresses, which has no host for gRPC
    to check the certificates against: the first address's host stands for both."""
    config = tls_config(demo, pki, mtls)
    client_cert, client_key = pki.client if mtls else ("", "")
    shim_config = replace(
        config,
        grpc_target_ca_file=pki.ca,
        grpc_client_cert_file=client_cert,
        grpc_client_key_file=client_key,
    )
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(serving(config)) for _ in range(replicas)]
        http = HttpServer(
            App(shim_config, ",".join(f"127.0.0.1:{server.port}" for server in servers)),
            "127.0.0.1:0",
            grace=1,
            tls=server_key_pair(config),
        )
        http.start()
        try:
            answer = seed_over_https(http.url, pki)
        finally:
            http.stop()
    assert http.url.startswith("https://")
    assert answer["result"] is True, answer


def test_files_that_will_not_do_are_named(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cert, key = pki.server
    _, other_key = pki.client
    cases = {
        (cert, ""): "TASKNODE_TLS_CERT_FILE is set but TASKNODE_TLS_KEY_FILE is not",
        ("", key): "TASKNODE_TLS_KEY_FILE is set but TASKNODE_TLS_CERT_FILE is not",
        (str(tmp_path / "missing.pem"), key): "TASKNODE_TLS_CERT_FILE: cannot read",
        (str(junk), key): f"TASKNODE_TLS_CERT_FILE {junk} holds no PEM certificate",
        (cert, str(junk)): f"TASKNODE_TLS_KEY_FILE {junk} is not an unencrypted PEM private key",
        (cert, other_key): f"TASKNODE_TLS_KEY_FILE {other_key} is not the key of {cert}",
    }
    for (cert_file, key_file), message in cases.items():
        config = Config(tls_cert_file=cert_file, tls_key_file=key_file)
        with pytest.raises(TLSError, match=re.escape(message)):
            server_credentials(config)
    with pytest.raises(TLSError, match="holds no PEM certificate"):
        server_credentials(Config(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=key))


def test_shim_settings_that_cannot_work_are_refused(pki: Pki) -> None:
    cert, key = pki.client
    with pytest.raises(TLSError, match="TASKNODE_GRPC_CLIENT_CERT_FILE needs"):
        channel_credentials(Config(grpc_client_cert_file=cert, grpc_client_key_file=key))


def test_serve_refuses_a_certificate_without_its_key(tmp_path: Path, pki: Pki) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        env={
            **os.environ,
            "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
            "TASKNODE_TLS_CERT_FILE": pki.server[0],
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: TASKNODE_TLS_CERT_FILE is set but TASKNODE_TLS_KEY_FILE is not:"
        " set both or neither\n"
    )


def first_printed_command(output: Iterable[str]) -> str:
    """The first curl command of the banner in output, its continued lines joined."""
    lines: list[str] = []
    for line in output:
        if lines or line.lstrip().startswith("curl "):
            lines.append(line.strip().removesuffix("\\").strip())
            if not line.rstrip().endswith("\\"):
                break
    return " ".join(lines)


def test_serve_in_two_processes_over_mtls(tmp_path: Path, pki: Pki) -> None:
    """The workers serve the same certificate; the shim in each calls gRPC in-process, so it
    needs no client certificate of its own."""
    cert, key = pki.server
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--demo"],
        env={
            **os.environ,
            "TASKNODE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "TASKNODE_GRPC_ADDR": "127.0.0.1:0",
            "TASKNODE_HTTP_ADDR": "127.0.0.1:0",
            "TASKNODE_GRPC_PROCESSES": "2",
            "TASKNODE_PIN_PROCESSES": "false",
            "TASKNODE_TLS_CERT_FILE": cert,
            "TASKNODE_TLS_KEY_FILE": key,
            "TASKNODE_TLS_CLIENT_CA_FILE": pki.ca,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        grpc_address = url = ""
        for line in process.stdout:
            if found := re.search(r"serving \S+ on (\S+) in 2 processes", line):
                grpc_address = found.group(1)
            if found := re.search(r"HTTP/JSON shim on (https://\S+),", line):
                url = found.group(1)
                break
        assert grpc_address and url, process.stdout.read()
        printed = first_printed_command(process.stdout)
        with grpc.secure_channel(grpc_address, credentials(pki, pki.client)) as channel:
            assert call_seed(channel)
        answer = seed_over_https(url, pki)
        assert answer["result"] is True, answer
        assert f"--cacert {cert} " in printed
        pasted = subprocess.run(printed, shell=True, capture_output=True, text=True, timeout=30)
        assert json.loads(pasted.stdout)["result"] is True, pasted
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        process.stdout.close()
    assert process.returncode == 0
