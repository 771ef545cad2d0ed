"""The code's layout holds its rules: no import circles, one task registry, run-directory file
names in one module, every decoding setting a flag."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detr.cli import build_parser
from detr.config import DecodeConfig
from tests.conftest import ROOT

PACKAGE = ROOT / "detr"
# Modules that stay imported inside functions: heavy, and needed only by one feature (pretrained
# encoders, TensorBoard logging, plots, ROUGE, the entity report), or the serving extra (fastapi and
# uvicorn, which detr.serve needs: the CLI imports it only for `detr serve`).
OPTIONAL = ("transformers", "torch.utils.tensorboard", "matplotlib", "rouge_score", "seqeval", "sklearn", "uvicorn",
            "detr.serve", "detr.export",  # serve and export: extras of their own
            # Parts of torch heavy to import, imported by the commands that use them (FSDP and its
            # checkpointing cost every other command a second of start-up).
            "torch.distributed.fsdp", "torch.distributed.checkpoint")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module imported, inside a function) for every import statement of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def detr_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        deps = set()
        for name, _ in imports_of(path):
            if name == "detr" or name.startswith("detr."):
                deps.add(name)
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def test_no_module_of_detr_imports_in_a_circle():
    graph = detr_graph()
    # a submodule import also runs its package's __init__
    # (a module's own packages are already initialising when it runs: those edges are not circles)
    edges = {m: {d for d in deps if d in graph} | {p for d in deps for p in _parents(d)
                                                   if p in graph and p != m and not m.startswith(p + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt == "detr" or node == "detr":
                continue  # the package itself re-exports the API; its modules never import names from it
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if state.get(nxt) is None:
                walk(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_imports_inside_functions_only_keep_optional_dependencies_optional():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in PACKAGE.rglob("*.py")
                 for name, in_function in imports_of(path)
                 if in_function and not name.startswith(OPTIONAL)]
    assert offenders == []


def test_no_task_name_switches_outside_the_registry():
    pattern = re.compile(r'name == "classify"|name == "tag"|task == "')
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in PACKAGE.rglob("*.py") if p != PACKAGE / "tasks" / "__init__.py"
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


# A Hugging Face model folder has files of the same names (its own layout, not a run directory's),
# and "pretrained" is also the tokenizer kind of a pretrained vocabulary.
NOT_RUN_FILES = {("pretrained.py", '"tokenizer.json"'), ("pretrained.py", '"model.safetensors"'),
                 ("tokenizer.py", '"tokenizer.json"'), ("tokenizer.py", '"pretrained"'),
                 ("huggingface.py", '"tokenizer.json"'), ("huggingface.py", '"model.safetensors"')}


@pytest.mark.parametrize("name", ["config.yaml", "tokenizer.json", "labels.json", "model.safetensors",
                                  "trainer_state.pt", "metrics.jsonl", "checkpoints", "pretrained"])
def test_run_directory_file_names_are_defined_only_in_rundir(name):
    needle = f'"{name}"'
    hits = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
            if p.name != "rundir.py" and (p.name, needle) not in NOT_RUN_FILES
            and needle in p.read_text(encoding="utf-8")]
    assert hits == []


@pytest.mark.parametrize("command", ["translate", "generate", "evaluate", "inspect"])
def test_every_decode_setting_is_a_flag_with_its_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flag = "--{}".format
    actions = {s: a for a in sub._actions for s in a.option_strings}
    for f in dataclasses.fields(DecodeConfig):
        action = actions.get(flag(f.name.replace("_", "-")))
        assert action is not None, f"{command}: no flag for decode.{f.name}"
        assert action.dest == f"decode_{f.name}" and f.metadata["help"] in action.help


def test_search_functions_have_no_decoding_defaults_of_their_own():
    from detr import search, translator

    for module in (search, translator):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                literal = [d for d in node.args.defaults + node.args.kw_defaults
                           if isinstance(d, ast.Constant) and isinstance(d.value, (int, float))
                           and not isinstance(d.value, bool)]
                assert not literal, f"{module.__name__}.{node.name} has numeric defaults"


def test_recipes_leave_vocabulary_sizes_to_the_tokenizer():
    for path in (ROOT / "configs").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "src_vocab_size" not in text and "tgt_vocab_size" not in text, path.name


def test_readme_says_this_is_not_the_object_detector():
    first = (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n")[1]
    assert "object detection" in first.lower() or "object-detection" in first.lower()


def test_import_detr_alone_starts_without_the_heavy_optional_libraries():
    code = "import sys, detr.cli; print(any(m in sys.modules for m in ('transformers', 'matplotlib', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
