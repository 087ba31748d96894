"""Every field of every run-config dataclass carries a docstring (a string right after the field)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from gptjt_core.config import RunConfig

# The tables of a run config today; a new one is found by the walk below without being listed.
KNOWN = {"RunConfig", "ModelConfig", "DataConfig", "SourceConfig", "UL2Config", "DenoiserConfig",
         "OptimConfig", "TrainConfig", "PipelineConfig", "AveragingConfig", "LinkConfig",
         "CoordinatorConfig", "SchedulerConfig"}


def run_dataclasses(root: type = RunConfig) -> dict[str, type]:
    """Every dataclass reachable from `root` through its field types (list[X] and X | None too)."""
    found: dict[str, type] = {}
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for hint in typing.get_type_hints(cls).values():
            for tp in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(tp):
                    todo.append(tp)
    return found


def undocumented_fields(class_source: str) -> list[str]:
    """Names of the annotated fields of the (first) class in `class_source` that no string
    literal follows, plus '<class>' when the class itself has no docstring."""
    (node,) = [n for n in ast.parse(textwrap.dedent(class_source)).body if isinstance(n, ast.ClassDef)]
    missing = [] if ast.get_docstring(node) else ["<class>"]
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                      and isinstance(nxt.value.value, str) and nxt.value.value.strip())
        if not documented:
            missing.append(stmt.target.id)
    return missing


def test_the_walk_finds_every_table_of_the_run_config():
    assert KNOWN <= set(run_dataclasses())


def test_every_run_config_field_has_a_docstring():
    missing = {name: undocumented_fields(inspect.getsource(cls))
               for name, cls in sorted(run_dataclasses().items())}
    missing = {name: fields for name, fields in missing.items() if fields}
    assert not missing, (f"undocumented run-config fields {missing}: put a string literal right after "
                         "each field stating its meaning, unit and valid range")


def test_every_dataclass_field_is_seen_by_the_source_check():
    # The check reads source; make sure it sees exactly the fields dataclasses knows about.
    for cls in run_dataclasses().values():
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        annotated = [s.target.id for s in tree.body[0].body if isinstance(s, ast.AnnAssign)]
        assert annotated == [f.name for f in dataclasses.fields(cls)], cls.__name__


def test_the_check_catches_a_field_without_a_docstring():
    source = '''
@dataclass
class Example:
    """An example."""

    documented: int = 1
    """Meaning, unit, range."""
    bare: int = 2
    empty: str = ""
    """ """
    last: float = 0.0
'''
    assert undocumented_fields(source) == ["bare", "empty", "last"]
    assert undocumented_fields("class NoDoc:\n    x: int = 1\n    'x'\n") == ["<class>"]
