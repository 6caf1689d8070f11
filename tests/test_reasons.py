"""Every reason code a stage module can write is in tasks/reasons.py (the docs' table comes from it).

Read from the code, not run: the reason argument of every ``.drop(row, reason)`` call, every
``Refused(reason, ...)`` and ``damage(reason, ...)``, the third item of every ``("drop", row,
reason)`` record, the crawler's trap bounds and extract's worker statuses, resolved to the string
literals (f-strings as families: ``http_<...>``) they can be. A reason given by an expression this
reading cannot resolve must be listed in INDIRECT with where its values come from; a new one fails.
The filter's ``<filter>:<rule>`` codes come from the filter module's own rule lists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tasks import reasons
from tasks.config import FilterConfig
from tasks.filter import build_filters

ROOT = Path(__file__).resolve().parent.parent

# (module, expression) -> where the reasons it holds are read from (each source is checked here)
INDIRECT = {
    ("collect.py", "*reason"): "decoded_row's ('drop', row, reason) records",
    ("collect.py", "rec[2]"): "the readers' and the WARC reader's ('drop', fields, reason) records",
    ("collect.py", "row['reason']"): "rows of an earlier run's collect, carried over unchanged",
    ("crawler.py", "refused[0]"): "TrapGuard's (reason, message) returns",
    ("crawler.py", "*trap"): "TrapGuard's (reason, message) returns",
    ("crawler.py", "e.reason"): "Refused(reason, ...) raised by the fetcher and the crawler",
    ("extract.py", "status"): "extract's worker statuses",
    ("filter.py", "reason"): "the filters' rules: <filter>:<rule>",
}


class Unresolved(Exception):
    pass


def values(expr: ast.expr, scope: ast.AST | None) -> set[str]:
    """The strings ``expr`` can be: literals, conditionals, f-strings (a placeholder for each
    formatted value), ``{...}.get(k, default)``, and names assigned so in ``scope``."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.IfExp):
        return values(expr.body, scope) | values(expr.orelse, scope)
    if isinstance(expr, ast.JoinedStr):
        return {"".join(v.value if isinstance(v, ast.Constant) else "<>" for v in expr.values)}
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "get"
            and isinstance(expr.func.value, ast.Dict)):
        out = set().union(*(values(v, scope) for v in expr.func.value.values))
        return out | (values(expr.args[1], scope) if len(expr.args) > 1 else set())
    if isinstance(expr, ast.Name) and scope is not None:
        assigned, elsewise = [], False   # bound only by plain assignments, or also otherwise?
        for n in _own_nodes(scope):
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Name) and t.id == expr.id:
                        assigned.append(n.value)
                    elif _binds(t, expr.id):
                        elsewise = True
            elif isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)) and _binds(n.target, expr.id):
                elsewise = True
            elif isinstance(n, ast.arg) and n.arg == expr.id:
                elsewise = True
        if assigned and not elsewise:
            return set().union(*(values(v, scope) for v in assigned))
    raise Unresolved(ast.unparse(expr))


def _binds(target: ast.AST, name: str) -> bool:
    return any(isinstance(x, ast.Name) and x.id == name for x in ast.walk(target))


def _own_nodes(scope: ast.AST):
    """The nodes of a function, those of functions defined inside it left out."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _own_nodes(child)


def reason_sites(tree: ast.Module, module: str):
    """(expression, enclosing function) of every place ``module`` hands over a reason."""
    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            yield from visit(child, inner)
            yield from walk(child, inner)

    def visit(node, scope):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "drop" and len(node.args) >= 2:
                yield node.args[1], scope
            elif name in ("Refused", "damage") and node.args:
                yield node.args[0], scope
            elif name == "append" and module == "extract.py" and node.args:   # a worker's (status, value)
                for t in ast.walk(node.args[0]):
                    if isinstance(t, ast.Tuple) and isinstance(t.elts[0], ast.Constant) and t.elts[0].value != "ok":
                        yield t.elts[0], scope
        elif isinstance(node, ast.Tuple) and node.elts and not any(isinstance(e, ast.Starred) for e in node.elts):
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value == "drop" and len(node.elts) >= 3:
                yield node.elts[2], scope
        elif module == "crawler.py" and isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) \
                and scope is not None and scope.name in ("refuse", "failing"):   # TrapGuard's (reason, message)
            yield node.value.elts[0], scope

    yield from walk(tree, None)


def written_reasons(paths) -> tuple[set[str], set[tuple[str, str]]]:
    found, unresolved = set(), set()
    for path in paths:
        for expr, scope in reason_sites(ast.parse(path.read_text(), str(path)), path.name):
            try:
                found |= values(expr, scope)
            except Unresolved as e:
                unresolved.add((path.name, str(e).replace('"', "'")))
    return found, unresolved


def listed(code: str) -> bool:
    """In the registry by name, or, for a code read with placeholders, as a family there."""
    if "<>" not in code:
        return reasons.known(code)
    shape = re.compile(re.escape(code).replace("<>", "<[^>]*>") + r"\Z")
    return any(shape.match(c) for c in reasons.REASONS)


def test_every_reason_a_stage_writes_is_registered():
    found, unresolved = written_reasons(sorted((ROOT / "tasks").glob("*.py")))
    assert {"empty_body", "crawl_trap", "warc_bad_gzip", "no_main_text", "exact_duplicate", "held_out",
            "contaminated", "http_<>", "sitemap_<>"} <= found   # the reading sees every kind of site
    assert not unresolved - set(INDIRECT), "reasons written from expressions this test cannot read: list their " \
                                           "codes in tasks/reasons.py and the expression in INDIRECT"
    assert not sorted(c for c in found if not listed(c)), "add these to tasks/reasons.py"
    written = {re.sub(r"<[^>]*>", "<>", c) for c in reasons.REASONS if reasons.REASONS[c][0] != "filter"}
    assert not sorted(written - found), "listed in tasks/reasons.py, but no stage writes them"


def test_every_filter_rule_is_registered():
    codes = {f"{f.name}:{r.name}" for f in build_filters(FilterConfig()) for r in f.rules}
    assert len(codes) > 25
    assert not sorted(codes - set(reasons.REASONS))


def test_every_registered_code_has_a_stage_and_a_meaning():
    for code, (stage, meaning) in reasons.REASONS.items():
        assert stage in reasons.STAGES and meaning.strip(), code
    assert reasons.known("http_404") and reasons.known("sitemap_timeout") and not reasons.known("http404")


def test_the_check_sees_an_unregistered_reason(tmp_path):
    bad = tmp_path / "stage.py"
    bad.write_text("def run(w, row, n, kind):\n"
                   "    w.drop(row, 'too_blue')\n"
                   "    why = 'too_red' if n else f'odd_{n}'\n"
                   "    raise Refused(why)\n"
                   "    yield 'drop', row, {'a': 'too_green'}.get(kind, 'held_out')\n"
                   "    w.drop(row, kind)\n")
    found, unresolved = written_reasons([bad])
    assert found == {"too_blue", "too_red", "odd_<>", "too_green", "held_out"}
    assert unresolved == {("stage.py", "kind")}
    assert [c for c in sorted(found) if not listed(c)] == ["odd_<>", "too_blue", "too_green", "too_red"]
