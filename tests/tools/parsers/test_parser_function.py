"""The `function` format: Python-style calls with literal keyword arguments."""

from __future__ import annotations

SCHEMAS = [{"name": "search", "parameters": {}}, {"name": "clock", "parameters": {}}]


def test_keyword_call(parse):
    (call,) = parse("function", 'I will call search(query="Python tutorials", max_results=5) now.')
    assert call.ok and call.raw_text == 'search(query="Python tutorials", max_results=5)'
    assert call.arguments == {"query": "Python tutorials", "max_results": 5}


def test_literals(parse):
    text = (
        "f(s='it\\'s \"q\"', n=-5, x=+2.5e3, t=True, fa=False, no=None, l=[1, (2, 3)], d={'k': {'v': [None]}},"
        " j=true, jn=null)"
    )
    (call,) = parse("function", text)
    assert call.arguments == {
        "s": 'it\'s "q"',
        "n": -5,
        "x": 2500.0,
        "t": True,
        "fa": False,
        "no": None,
        "l": [1, [2, 3]],
        "d": {"k": {"v": [None]}},
        "j": True,
        "jn": None,
    }


def test_list_and_several_calls(parse):
    text = "[search(query='a'), clock()] and later get_weather(city='Paris')"
    assert [(c.name, c.arguments) for c in parse("function", text)] == [
        ("search", {"query": "a"}),
        ("clock", {}),
        ("get_weather", {"city": "Paris"}),
    ]


def test_dotted_names(parse):
    (call,) = parse("function", 'brave_search.call(query="x")')
    assert call.name == "brave_search.call"


def test_prose_is_not_a_call(parse):
    text = "see (below), print(x), f(1, 2), e.g(x) or sorted(key), x == (y), obj.method (z=1) — done()."
    assert [c.name for c in parse("function", text)] == ["done"]


def test_non_literal_values(parse):
    calls = parse("function", "f(a=len) g(b=1 + 2) h(c={1, 2}) k(d=b'x') m(e=1j) ok(x=1)")
    assert [(c.name, c.status) for c in calls] == [
        ("f", "invalid_arguments"),
        ("g", "invalid_arguments"),
        ("h", "invalid_arguments"),
        ("k", "invalid_arguments"),
        ("m", "invalid_arguments"),
        ("ok", "ok"),
    ]


def test_syntax_error(parse):
    bad, good = parse("function", "f(a=, b=2) g(c=3)")
    assert bad.status == "invalid_arguments" and good.ok


def test_known_names(parse):
    text = "print(x) search('positional') clock(**kw) search(query=lookup) clock() other(a=1)"
    calls = parse("function", text, tool_schemas=SCHEMAS)
    assert [(c.name, c.status) for c in calls] == [
        ("search", "invalid_arguments"),
        ("clock", "invalid_arguments"),
        ("search", "invalid_arguments"),
        ("clock", "ok"),
    ]


def test_call_inside_a_string_argument_is_not_a_call(parse):
    (call,) = parse("function", "run(code=\"other(a=1)\", note='x(y=2)')")
    assert call.name == "run" and call.arguments == {"code": "other(a=1)", "note": "x(y=2)"}


def test_nested_call_is_reported_once(parse):
    (call,) = parse("function", "outer(a=inner(b=1))")
    assert call.name == "outer" and call.status == "invalid_arguments"


def test_unclosed(parse):
    ok, unclosed = parse("function", 'clock() then search(query="Pyth')
    assert ok.ok and unclosed.status == "unclosed" and unclosed.name == "search"
    assert unclosed.raw_text == 'search(query="Pyth'


def test_broken_quote_only_hides_one_line(parse):
    text = 'f(a="x\nnope)\ng(b=1)'
    assert [(c.name, c.status) for c in parse("function", text)] == [("f", "invalid_arguments"), ("g", "ok")]
