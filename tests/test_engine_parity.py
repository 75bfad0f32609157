"""Both engines against the contract, fastmesh/_core.pyi: the same public methods
and properties with the same signatures, the same stats() keys, the records of
fastmesh.records, and the same error types for bad arguments. Any drift fails."""

from __future__ import annotations

import ast
import inspect
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import listening_socket

import fastmesh
from fastmesh import _engine_py, contract, records
from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import ExchangeSettings, encode_frame
from fastmesh.routing import RouteTable

try:
    from fastmesh import _core
except ImportError:  # test_engine_selection.py reports it
    _core = None

STUB = Path(fastmesh.__file__).with_name("_core.pyi")
ENGINES = {"cython": _core, "python": _engine_py}


@pytest.fixture(params=sorted(ENGINES))
def module(request: pytest.FixtureRequest) -> Any:
    if ENGINES[request.param] is None:
        pytest.fail("fastmesh._core is not built: run `pip install -e .`")
    return ENGINES[request.param]


def stub_engine() -> tuple[dict[str, ast.FunctionDef], set[str]]:
    """The methods (name -> definition) and properties the stub declares for Engine."""
    tree = ast.parse(STUB.read_text())
    (engine,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Engine"]
    methods, properties = {}, set()
    for node in engine.body:
        if isinstance(node, ast.FunctionDef):
            if any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
                properties.add(node.name)
            else:
                methods[node.name] = node
    return methods, properties


def stub_parameters(definition: ast.FunctionDef) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter after self; a default of `...` is "any"."""
    args = definition.args
    positional = args.posonlyargs + args.args
    defaults: list[object] = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [ast.literal_eval(d) if not (isinstance(d, ast.Constant) and d.value is ...) else ...
                 for d in args.defaults]
    found = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(positional, defaults)]
    found += [(a.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else
               (... if isinstance(d, ast.Constant) and d.value is ... else ast.literal_eval(d)))
              for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return found[1:]


def actual_parameters(function: Any) -> list[tuple[str, str, object]]:
    signature = inspect.signature(function)
    return [(p.name, p.kind.name, p.default) for p in list(signature.parameters.values())[1:]]


def matches(stub: list[tuple[str, str, object]], actual: list[tuple[str, str, object]]) -> bool:
    return len(stub) == len(actual) and all(
        s[:2] == a[:2] and (s[2] is ... and a[2] is not inspect.Parameter.empty or s[2] == a[2])
        for s, a in zip(stub, actual))


def test_the_stub_declares_what_the_engines_export(module):
    methods, properties = stub_engine()
    public = {name for name in dir(module.Engine) if not name.startswith("_")}
    assert public == set(methods) - {"__init__"} | properties
    for name in public:
        is_property = inspect.isdatadescriptor(inspect.getattr_static(module.Engine, name))
        assert is_property == (name in properties), name
    for name in ("IMPLEMENTATION", "SPLICE_SUPPORTED"):
        assert hasattr(module, name)


def test_every_method_has_the_stubs_signature(module):
    methods, _ = stub_engine()
    for name, definition in methods.items():
        if name == "__init__":
            continue
        assert matches(stub_parameters(definition), actual_parameters(getattr(module.Engine, name))), name


def test_the_constructor_takes_the_stubs_arguments_with_the_shared_defaults(module):
    methods, _ = stub_engine()
    parameters = stub_parameters(methods["__init__"])
    names = [name for name, _, _ in parameters]
    if module is _engine_py:
        assert matches(parameters, actual_parameters(module.Engine.__init__))
        defaults = {p.name: p.default for p in inspect.signature(module.Engine).parameters.values()}
    else:  # a cdef class's __init__ has no introspectable signature; Cython embeds it in the docstring
        header = module.Engine.__doc__.splitlines()[0]
        defaults = {name: getattr(DEFAULTS, name) for name in names if f"{name}=DEFAULTS.{name}" in header}
    assert defaults == {name: getattr(DEFAULTS, name) for name in names}
    # Positional only as far as the stub says, keywords by the stub's names.
    module.Engine(**{name: getattr(DEFAULTS, name) for name in names}).stop()
    positional = [name for name, kind, _ in parameters if kind == "POSITIONAL_OR_KEYWORD"]
    with pytest.raises(TypeError):
        module.Engine(*[getattr(DEFAULTS, name) for name in names[:len(positional) + 1]])
    with pytest.raises(TypeError):
        module.Engine(no_such_option=1)


def test_stats_keys_are_the_contracts_in_order(module):
    engine = module.Engine(workers=2)
    try:
        assert tuple(engine.stats()) == contract.STATS
        assert all(isinstance(value, int) and value >= 0 for value in engine.stats().values())
    finally:
        engine.stop()


def test_records_are_the_shared_named_types(module, upstream):
    server = upstream(lambda conn: conn.sendall(conn.recv(16)))
    engine = module.Engine()
    sock = listening_socket()
    sock.setblocking(False)
    try:
        listener_id = engine.add_listener(sock.fileno(), RouteTable.single([server.address]))
        engine.start()
        with socket.create_connection(sock.getsockname()) as client:
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
            (info,) = engine.connections()
            assert_record(info, records.ConnectionInfo)
            assert_record(info.downstream, records.FlowInfo)
            assert_record(info.upstream, records.FlowInfo)
            assert (info.listener_id, info.cluster, info.endpoint, info.state) == (listener_id, 0, 0, "open")
            batch = engine.collect()
            assert_record(batch, records.Batch)
            (opened,) = batch.opened
            assert_record(opened, records.Opened)
            (updated,) = batch.updated
            assert_record(updated, records.Updated)
        down_app, down = socket.socketpair()
        up, up_app = socket.socketpair()
        relayed = engine.relay(down.detach(), up.detach())
        down_app.close()  # both ends go: the pair closes cleanly
        up_app.close()
        deadline = time.monotonic() + 20
        closed: list[Any] = []
        while len(closed) < 2 and time.monotonic() < deadline:
            batch = engine.collect()
            closed += batch.closed
            time.sleep(0.02)
        assert {record.conn_id for record in closed} == {opened.conn_id, relayed}
        for record in closed:
            assert_record(record, records.Closed)
            expected = (None, None, None) if record.conn_id == relayed else (listener_id, 0, 0)
            assert (record.listener_id, record.cluster, record.endpoint) == expected
    finally:
        engine.stop()
        sock.close()


def assert_record(record: Any, kind: type) -> None:
    # The engines build records with tuple.__new__, which does not check the length.
    assert type(record) is kind and len(record) == len(kind._fields), record
    for name, value in record._asdict().items():
        assert value is None or isinstance(value, (int, str, bytes, tuple, list)), (name, value)


def routes() -> RouteTable:
    return RouteTable.single([("127.0.0.1", 9)])


FRAME = encode_frame({"NAME": "n"})
BAD_CALLS = [
    ("workers 0", lambda E: E(workers=0), ValueError),
    ("too many workers", lambda E: E(workers=contract.MAX_WORKERS + 1), ValueError),
    ("small buffer", lambda E: E(buffer_size=contract.MIN_BUFFER_SIZE - 1), ValueError),
    ("negative pipe size", lambda E: E(pipe_size=-1), ValueError),
    ("workers as text", lambda E: E(workers="2"), TypeError),
    ("upstreams as a list", lambda E, e, fd: e.add_listener(fd, [("127.0.0.1", 9)]), TypeError),
    ("exchange of another type", lambda E, e, fd: e.add_listener(fd, routes(), "inbound"), TypeError),
    ("exchange role", lambda E, e, fd: e.add_listener(fd, routes(), ExchangeSettings("sideways", FRAME)),
     ValueError),
    ("exchange frame larger than a buffer",
     lambda E, e, fd: e.add_listener(fd, routes(), ExchangeSettings("inbound", FRAME + b"x" * 70000)), ValueError),
    ("infinite exchange timeout",
     lambda E, e, fd: e.add_listener(fd, routes(), ExchangeSettings("inbound", FRAME, frame_timeout=float("inf"))),
     ValueError),
    ("listener fd", lambda E, e, fd: e.add_listener(-1, routes()), OSError),
    ("unknown listener", lambda E, e, fd: e.remove_listener(7), ValueError),
    ("relay fd", lambda E, e, fd: e.relay(-1, -1), OSError),
]


@pytest.mark.parametrize("call, error", [(c, e) for _, c, e in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS])
def test_bad_arguments_raise_the_same_error_type(module, call, error):
    if call.__code__.co_argcount == 1:
        with pytest.raises(error):
            call(module.Engine)
        return
    engine = module.Engine()
    try:
        with listening_socket() as sock:
            sock.setblocking(False)
            with pytest.raises(error):
                call(module.Engine, engine, sock.fileno())
    finally:
        engine.stop()


def test_a_stopped_engine_refuses_work_the_same_way(module):
    engine = module.Engine()
    engine.start()
    engine.stop()
    assert engine.running is False
    with listening_socket() as sock:
        with pytest.raises(RuntimeError):
            engine.add_listener(sock.fileno(), routes())
    left, right = socket.socketpair()
    with left, right, pytest.raises(RuntimeError):
        engine.relay(left.fileno(), right.fileno())
    with pytest.raises(RuntimeError):
        engine.start()
