"""
Named routes end to end: the installed ``twistd tcprelay`` with ``--http``,
``--tls`` and ``--domain``, ``tcprelay expose --http/--tls`` agents, and
independent clients (``http.client``, ``ssl``) on loopback.
"""

from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.support import HOST, HttpService, Procs, free_port_block, start_agent, start_relay

DOMAIN = "example.test"


def _relay(procs: Procs) -> tuple[object, int, int]:
    base = free_port_block(2)
    http_port, tls_port = base, base + 1
    relay = start_relay(
        procs,
        "--http", f"tcp:{http_port}:interface={HOST}",
        "--tls", f"tcp:{tls_port}:interface={HOST}",
        "--domain", DOMAIN,
        pool=2,
    )
    return relay, http_port, tls_port


def _get(port: int, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/hello", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def services() -> Iterator[dict[str, HttpService]]:
    made: dict[str, HttpService] = {}
    yield made
    for service in made.values():
        service.close()


def test_two_names_by_host_then_unknown_and_wildcard(procs: Procs, services: dict[str, HttpService]) -> None:
    """Agents `a`, `b` and `*.w` on one HTTP port: each Host reaches its own service, head unchanged; an unknown host gets 404."""
    relay, http_port, _ = _relay(procs)
    for name in ("a", "b", "*.w"):
        services[name] = HttpService(name)
        agent = start_agent(procs, services[name].port, relay.address, "--http", name, name=f"agent-{name}")
        url = agent.proc.wait_line(r"^(http://\S+)$", 20, stream="out").group(1)
        assert url == f"http://{name}.{DOMAIN}:{http_port}/"
    assert _get(http_port, f"a.{DOMAIN}") == (200, b"service a\n")
    assert _get(http_port, f"B.{DOMAIN}:{http_port}") == (200, b"service b\n")
    assert _get(http_port, f"x.y.w.{DOMAIN}") == (200, b"service *.w\n")
    head = services["a"].heads[0]
    assert head.startswith(b"GET /hello HTTP/1.1\r\n") and f"Host: a.{DOMAIN}".encode() in head
    status, body = _get(http_port, f"nobody.{DOMAIN}")
    assert status == 404 and f"nobody.{DOMAIN}".encode() in body


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for s.DOMAIN (and its key), made with cryptography."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"s.{DOMAIN}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"s.{DOMAIN}")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "s.pem", directory / "s.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_by_sni_to_an_agent_whose_service_terminates_tls(procs: Procs, tmp_path: Path) -> None:
    """A TLS client with server_hostname=s.DOMAIN reaches, through the TLS entrance, a local service that terminates TLS; the certificate verifies end to end."""
    relay, _, tls_port = _relay(procs)
    cert, key = _certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server((HOST, 0))
    local_port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with server_context.wrap_socket(conn, server_side=True) as tls:
            data = tls.recv(100)
            tls.sendall(b"tls says: " + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        agent = start_agent(procs, local_port, relay.address, "--tls", "s", name="agent-s")
        assert agent.proc.wait_line(r"^(https://\S+)$", 20, stream="out").group(1) == f"https://s.{DOMAIN}:{tls_port}/"
        client_context = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection((HOST, tls_port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname=f"s.{DOMAIN}") as tls:
                tls.sendall(b"ping")
                assert tls.recv(100) == b"tls says: ping"
                assert tls.getpeercert()["subject"][0][0][1] == f"s.{DOMAIN}"
        with socket.create_connection((HOST, tls_port), timeout=10) as raw:
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
                with client_context.wrap_socket(raw, server_hostname=f"other.{DOMAIN}"):
                    pass
    finally:
        listener.close()
        thread.join(5)


def test_pooled_agents_share_a_name_and_survive_one_dying(procs: Procs, services: dict[str, HttpService]) -> None:
    """Two `expose --http p --pool` agents: visitors reach both; killing one leaves the name up on the other."""
    relay, http_port, _ = _relay(procs)
    agents = {}
    for which in ("one", "two"):
        services[which] = HttpService(which)
        agents[which] = start_agent(procs, services[which].port, relay.address, "--http", "p", "--pool", name=f"agent-{which}")
        agents[which].proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    answers = [_get(http_port, f"p.{DOMAIN}") for _ in range(20)]
    assert {status for status, _ in answers} == {200}
    assert {body for _, body in answers} == {b"service one\n", b"service two\n"}
    agents["one"].proc.kill()
    later = [_get(http_port, f"p.{DOMAIN}") for _ in range(10)]
    assert later == [(200, b"service two\n")] * 10
