"""A DNS server for tests: answers A and AAAA queries from a dict the test changes at will."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class Zone:
    """Names to addresses (a list per name, IPv4 and IPv6 alike), and who asked for what."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.asked: list[str] = []

    def answer(self, query: bytes) -> bytes:
        """The response to one query: the records of its name and type, or NXDOMAIN."""
        message = dns.message.from_wire(query)
        reply = dns.message.make_response(message)
        question = message.question[0]
        name = question.name.to_text().rstrip(".").lower()
        self.asked.append(name)
        wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        addresses = [a for a in self.records.get(name, []) if (":" in a) == (wanted == 6)]
        if name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif addresses:
            kind = dns.rdatatype.to_text(question.rdtype)
            reply.answer.append(
                dns.rrset.from_text(question.name, 1, dns.rdataclass.IN, kind, *addresses)
            )
        return bytes(reply.to_wire())


@contextmanager
def dns_server() -> Iterator[tuple[str, Zone]]:
    """A UDP DNS server on 127.0.0.1 (any free port): its "host:port" and its zone."""
    zone = Zone()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                query, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(zone.answer(query), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}", zone
    finally:
        stop.set()
        thread.join()
        sock.close()
