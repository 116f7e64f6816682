"""Port selection for servers that take consecutive ports."""

import socket

from common.processes import free_port_block, port_bindable
from serving.backends.ports import PortPool


def test_a_bound_port_is_not_bindable_even_when_nothing_listens() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connect() would be refused
        port = held.getsockname()[1]
        assert not port_bindable(port)
    assert port_bindable(port)


def test_port_blocks_are_free_and_below_the_ephemeral_range() -> None:
    start = free_port_block(5)
    assert start + 5 < 32768
    assert all(port_bindable(p) for p in range(start, start + 5))


def test_the_port_pool_skips_ports_it_cannot_bind_and_takes_back_released_ones() -> None:
    start = free_port_block(5)  # start .. start + 4 are used below
    with socket.socket() as held:
        # Listening with SO_REUSEADDR, as a server holds a port: a bind without it fails
        # on a port whose earlier connections still sit in TIME_WAIT (earlier tests).
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", start))
        held.listen()
        pool = PortPool("127.0.0.1", start)
        assert pool.take() == start + 1
        assert pool.take() == start + 2
        pool.hold(start + 3)
        pool.release(start + 1)
        assert pool.take() == start + 1
        assert pool.take() == start + 4
