"""Hostile inputs (issue 12): recipes, baselines and ONNX models crafted to crash, hang or exhaust memory. Each
must end in one short line on stderr and exit code 2 (a UserError), with nothing written.

Recipe errors fail before any model loads, so most cases run in-process (resolve_recipe, check_artifact, the CLI
through click's runner); a few go through the `compress` command as a user runs it."""
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from compressor.check import check_artifact
from compressor.cli import main
from compressor.errors import UserError
from compressor.recipes import Recipe, resolve_recipe
from passes.registry import PASSES

FAST = ("--eval-limit", "8", "--no-bench", "--quiet")  # nothing here reads latency
MAX_MESSAGE = 500


def _short_line(message: str) -> str:
    assert "\n" not in message and "\r" not in message, message[:1000]
    assert len(message) < MAX_MESSAGE, message[:1000]
    return message


def _user_error(call) -> str:
    """The UserError's message, checked to be one short line."""
    with pytest.raises(UserError) as exc:
        call()
    return _short_line(str(exc.value))


def _one_line_error(done) -> str:
    """A finished `compress` (subprocess or click's runner): exit 2 and exactly one line on stderr, `error: ...`."""
    code = getattr(done, "returncode", getattr(done, "exit_code", None))
    assert code == 2, (code, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr[:2000]
    return _short_line(lines[0])


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------------------------------------------- recipes

def _billion_laughs() -> str:
    """Nine levels of nine aliases: a few hundred bytes that expand to 9**9 (387 million) strings."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for previous, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]\n"
    return text + "passes: [{quantize: {bits: *i}}]\n"


def test_yaml_alias_bomb_is_refused_outright(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs())
    assert bomb.stat().st_size < 600
    started = time.monotonic()  # in-process: the bound below times the refusal, not a loaded machine's start-up
    done = _cli("run", "gpt-xs", "--recipe", str(bomb), "--out", str(tmp_path / "out"))
    line = _one_line_error(done)
    assert "anchors and aliases" in line and len(line) < 200
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()
    # the same through --set (argv is YAML too), a merge key, and an anchor alone
    for overrides in (("quantize.overrides={a: &x {bits: 8}, b: *x}",), ("gates.min_recovery=&x 0.5",)):
        assert "anchors and aliases" in _user_error(lambda: resolve_recipe("int4", overrides))
    for text in ("base: &b {bits: 4}\npasses: [{quantize: {<<: *b}}]\n", "passes: &p []\n"):
        bomb.write_text(text)
        assert "anchors and aliases" in _user_error(lambda: resolve_recipe(str(bomb)))


HUGE_INT = "0x" + "f" * 5000  # 6021 decimal digits: repr() of it raises ValueError (the 4300-digit limit)
RECIPE_FILES = [  # (file text, what the one-line message must say)
    ("passes: [{quantize: {1: 2, zz: 3}}]\n", "quantize: unknown key 'zz'"),  # keys of mixed types: no TypeError
    ("passes: [{quantize: {null: 2, 3.5: 3}}]\n", "quantize: unknown key"),
    ('passes: [{quantize: {overrides: {"re:lm_head": {full_range: "false"}}}}]\n',
     "quantize.overrides['re:lm_head'].full_range must be bool, not 'false'"),
    ('passes: [{quantize: {dtype: kmeans, overrides: {"re:lm_head": {kmeans_iterations: 2.5}}}}]\n',
     "quantize.overrides['re:lm_head'].kmeans_iterations must be int, not 2.5"),
    ('passes: [{quantize: {overrides: {"re:lm_head": {bits: "8"}}}}]\n', "quantize.overrides['re:lm_head'].bits must be int"),
    ('passes: [{quantize: {overrides: {"re:lm_head": {bits: 9}}}}]\n', "quantize.overrides['re:lm_head']: quantize.bits"),
    ('passes: [{quantize: {overrides: {"re:lm_head": {targets: 5}}}}]\n', "cannot be overridden per layer"),
    ("passes: [{quantize: {overrides: [1, 2]}}]\n", "quantize.overrides must map"),
    ("passes: [{quantize: {calibration_samples: 1000000000000}}]\n",
     "quantize.calibration_samples must be at most 100,000, not 1000000000000"),
    ("passes: [{heal: {steps: 1000000000}}]\n", "heal.steps must be at most 6,250, not 1000000000"),
    ("passes: [{heal: {seed: -1}}]\n", "heal.seed must be at least 0"),
    ("passes: [{quantize: {dtype: kmeans, kmeans_iterations: 100000}}]\n", "kmeans_iterations must be at most 10,000"),
    ("passes: [{lowrank: {rank_multiple: 100000}}]\n", "lowrank.rank_multiple must be at most 1,024"),
    ("passes: [{prune: {calibration_samples: 100001}}]\n", "prune.calibration_samples must be at most 100,000"),
    ("passes: [{structured_prune: {calibration_samples: 10000000}}]\n", "must be at most 100,000"),
    ("passes: [{quantize: {exponent_bits: 100}}]\n", "quantize.exponent_bits must be at most 7"),
    ("passes: [{prune: {pattern: '1:100000'}}]\n", "M must be at most"),
    (f"passes: [{{quantize: {{bits: {HUGE_INT}}}}}]\n", "bits must be an integer in 2..8, not <an integer of 6021 digits>"),
    (f"passes: [{{heal: {{learning_rate: {HUGE_INT[:402]}}}}}]\n", "learning_rate must be a number a float can hold"),
    (f"gates: {{min_recovery: {HUGE_INT[:402]}}}\n", "gates.min_recovery must be a positive number"),
    ("passes: [{quantize: {bits: " + "9" * 5000 + "}}]\n", "cannot read a value"),  # int() refuses 5000 digits
    ("passes: [{quantize: {bits: " + ":".join(["59"] * 3000) + "}}]\n", "an integer of"),  # base 60, YAML 1.1
    ("passes: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 16 levels"),  # the composer recurses
    ("passes: [{quantize: {dtype: " + "x" * 100_000 + "}}]\n", "(100,000 characters)"),
    ("passes: [{" + "x" * 100_000 + ": {}}]\n", "not valid YAML"),  # a plain key of over 1024 characters
    ("passes: [{quantize: {targets: ['re:" + "(" * 3000 + ")" * 3000 + "']}}]\n", "not a valid regular expression"),
    ("passes: [{quantize: {targets: ['re:a{99999999999999999999}']}}]\n", "not a valid regular expression"),
    ("passes: [{quantize: {overrides: {'re:(': {bits: 8}}}}]\n", "not a valid regular expression"),
    ("passes: [{quantize: {bits: !!binary aGVsbG8=}}]\n", "quantize.bits must be int"),
    ("passes: [{quantize: {bits: !!python/object:os.system x}}]\n", "not valid YAML"),
    ("passes: [{quantize: {targets: !!set {a, b}}}]\n", "must be a list of module names"),
    ("gates: {min_recovery: 2001-12-14}\n", "gates.min_recovery must be a positive number"),
    ("passes: []\n---\npasses: []\n", "not valid YAML"),
    ("passes: false\n", "'passes' must be a list"),
    ("passes: [\0]\n", "not valid YAML"),
    ("# " + "x" * (2 << 20) + "\n", "not a recipe (at most 1,048,576)"),
]


def test_recipe_files_fail_with_one_short_line(tmp_path):
    path = tmp_path / "r.yaml"
    for text, needle in RECIPE_FILES:
        path.write_text(text, encoding="utf-8")
        started = time.monotonic()
        message = _user_error(lambda: resolve_recipe(str(path)))
        assert needle in message, (text[:80], message)
        assert time.monotonic() - started < 5, text[:80]


def test_recipe_paths_that_are_not_files(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    (tmp_path / "folder.yaml").mkdir()
    assert "not a file" in _user_error(lambda: resolve_recipe(str(fifo)))
    assert "not a file" in _user_error(lambda: resolve_recipe(str(tmp_path / "folder.yaml")))
    assert "No such file" in _user_error(lambda: resolve_recipe(str(tmp_path / "missing.yaml")))
    assert "cannot read recipe" in _user_error(lambda: resolve_recipe("nul\0.yaml"))
    assert "unknown recipe" in _user_error(lambda: resolve_recipe("x" * 100_000))  # too long a name to stat
    (tmp_path / "latin1.yaml").write_bytes(b"passes: [\xff]\n")
    assert "cannot read recipe" in _user_error(lambda: resolve_recipe(str(tmp_path / "latin1.yaml")))


@pytest.mark.parametrize("override, needle", [
    ("quantize.calibration_samples=1000000000000", "quantize.calibration_samples must be at most 100,000"),
    ("heal.steps=1000000000", "heal.steps must be at most 6,250"),
    ("quantize.overrides={'re:lm_head': {full_range: 'false'}}", "quantize.overrides['re:lm_head'].full_range"),
    ("quantize.overrides={'re:lm_head': {kmeans_iterations: 2.5}}", "kmeans_iterations must be int, not 2.5"),
    (f"quantize.bits={HUGE_INT}", "<an integer of 6021 digits>"),
    ("quantize.bits=" + "[" * 5000, "nested deeper"),
    ("quantize.targets=re:" + "(" * 3000, "not a valid regular expression"),
    ("quantize.gptq_damp=1" + "0" * 400, "a number a float can hold"),
    ("x" * 100_000 + ".bits=1", "unknown pass"),
    ("quantize." + "y" * 100_000 + "=1", "unknown key"),
    ("gates.min_recovery=" + "[" * 3, "cannot read"),
    ("gates." + "z" * 100_000 + "=1", "gates: unknown key"),
])
def test_set_values_fail_with_one_short_line(override, needle):
    assert needle in _user_error(lambda: resolve_recipe("int4", (override,)))


def test_recipe_errors_through_the_cli_before_any_model_loads(compress, tmp_path):
    """As a user runs it: exit 2, one line naming the field, and no --out folder."""
    out = tmp_path / "out"
    line = _one_line_error(compress("run", "gpt-xs", "--out", str(out), "--recipe", "kmeans4",
                                    "--set", "quantize.overrides={'re:lm_head': {kmeans_iterations: 2.5}}"))
    assert line == "error: quantize.overrides['re:lm_head'].kmeans_iterations must be int, not 2.5"
    assert not out.exists()
    for override, needle in (("quantize.calibration_samples=1000000000000", "quantize.calibration_samples must be"),
                             ("heal.steps=1000000000", "heal.steps must be at most"),
                             ("quantize.overrides={'re:lm_head': {full_range: 'false'}}",
                              "quantize.overrides['re:lm_head'].full_range must be bool")):
        line = _one_line_error(_cli("run", "gpt-xs", "--out", str(out), "--recipe", "int4", "--set", override))
        assert needle in line and not out.exists(), line


# The property: whatever a recipe file or a --set value holds, resolve_recipe returns a Recipe or raises a
# UserError with one short line; never another exception.
FIELDS = sorted({f for spec in PASSES.values() for f in spec.config.__dataclass_fields__}
                | {"min_recovery", "min_speedup", "require_parity"})
LONG_TEXT = st.builds(lambda c, n: c * n, st.characters(), st.integers(100, 3000))  # messages must quote excerpts
NAMES = (st.sampled_from([*PASSES, "gates", "passes", *FIELDS, "re:lm_head", "lm_head"]) | st.text(max_size=12)
         | LONG_TEXT)
KEYS = NAMES | st.integers() | st.none() | st.booleans() | st.floats(allow_nan=False)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**4000), max_value=2**4000)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | LONG_TEXT
           | st.sampled_from(["2:4", "re:.*", "int", "kmeans", "gptq", "float", "nf", "row", "block", "1:0", "re:("]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)
PASS_FIELDS = st.sampled_from(sorted(PASSES)).flatmap(lambda name: st.tuples(
    st.fixed_dictionaries({}, optional={f: VALUES for f in PASSES[name].config.__dataclass_fields__}),
    st.dictionaries(KEYS, VALUES, max_size=2),  # unknown keys of any type beside the known ones
).map(lambda known_and_more: {name: {**known_and_more[1], **known_and_more[0]}}))
RECIPES = st.fixed_dictionaries({}, optional={
    "passes": st.lists(PASS_FIELDS | st.dictionaries(KEYS, VALUES, max_size=2), max_size=4) | VALUES,
    "gates": st.dictionaries(KEYS, VALUES, max_size=3) | VALUES}) | st.dictionaries(KEYS, VALUES, max_size=3) | VALUES


def _holds(call) -> None:
    try:
        result = call()
    except UserError as exc:
        _short_line(str(exc))
    else:
        assert isinstance(result, Recipe)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(document=RECIPES, flow=st.booleans())
def test_property_recipe_documents(tmp_path_factory, document, flow):
    import yaml

    path = tmp_path_factory.getbasetemp() / "property.yaml"
    path.write_text(yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True), encoding="utf-8")
    _holds(lambda: resolve_recipe(str(path)))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.text(max_size=300) | st.binary(max_size=300))
def test_property_recipe_file_bytes(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "property-raw.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    _holds(lambda: resolve_recipe(str(path)))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from([*PASSES, "gates"]) | st.text(max_size=10),
       key=st.sampled_from(FIELDS) | st.text(max_size=10) | LONG_TEXT,
       value=st.text(max_size=40) | LONG_TEXT | VALUES.map(lambda v: json.dumps(v, default=str)),
       base=st.sampled_from(["fp32", "int4", "kmeans4", "q4_1", "chain-int4"]))
def test_property_set_values(target, key, value, base):
    _holds(lambda: resolve_recipe(base, (f"{target}.{key}={value}",)))


# ------------------------------------------------------------------------- re: patterns that backtrack for hours
# Each refused one takes exponential (or n^4 and more) time in Python's re on a module name that nearly matches;
# the checker (compressor.regex_safety.regex_backtracking_problem) finds them in re's own parse tree.
REFUSED_PATTERNS = {
    r"(a+)+$": "nests a repeat", r"(a*)*$": "nests a repeat", r"((ab)+)+$": "nests a repeat",
    r"(x+x+)+y": "nests a repeat", r"(\w+\s?)+$": "nests a repeat", r"(a?){30}a{30}": "nests a repeat",
    r"(.*a){12}": "nests a repeat", r"^(([a-z])+.)+[A-Z]([a-z])+$": "nests a repeat",
    r"(a|a)+$": "repeats alternatives", r"(a|aa)+$": "repeats alternatives", r"(\d+|\w+)*x": "repeats alternatives",
    r"^(block|blocks|s)+$": "repeats alternatives",
    ".*.*.*.*x": "4 repeats that compete", "a?" * 30 + "a" * 30: "30 repeats that compete",
    "(lm_head)?" * 30: "longer than 256 characters",
}
ACCEPTED_PATTERNS = [
    "lm_head", r"^model\.layers\.\d+\.(q|k|v)_proj$", ".*attn.*", r"blocks\.[0-3]\.", r"(\w+\.)*x$",
    r"^(\w+\.)*\w+$", "(ab|a)+$", "(lm_head|layers)+", r"(\.\d+){2}", r"^(model\.)?layers\.\d+\.(self_)?attn",
    ".*a.*b.*c", r"mlp\.(fc_in|fc_out)", "(?=.*attn).*proj", r"\bq_proj\b", r"[^.]+\.weight",
    r"(?:blocks\.\d+\.)+mlp", ".*", "(?i)(a|A)+$", r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|output)",
]


@pytest.mark.parametrize("pattern", REFUSED_PATTERNS)
def test_regex_that_backtracks_catastrophically_is_refused(pattern):
    from compressor.regex_safety import regex_backtracking_problem

    assert REFUSED_PATTERNS[pattern] in regex_backtracking_problem(pattern)
    # the same, in each place a recipe holds module patterns: one line, before any model loads
    for override in (f"quantize.overrides={json.dumps({'re:' + pattern: {'bits': 8}})}",
                     f"prune.targets=re:{pattern}", f"lowrank.ignore=re:{pattern}"):
        line = _user_error(lambda: resolve_recipe("int4", (override,)))
        assert REFUSED_PATTERNS[pattern] in line and line.split(":")[0] in (
            "quantize.overrides", "prune.targets", "lowrank.ignore"), line


@pytest.mark.parametrize("pattern", ACCEPTED_PATTERNS)
def test_usual_module_patterns_are_accepted_and_fast(pattern):
    import re

    from compressor.regex_safety import regex_backtracking_problem

    assert regex_backtracking_problem(pattern) is None
    recipe = resolve_recipe("int4", (f"quantize.overrides={json.dumps({'re:' + pattern: {'bits': 8}})}",))
    assert recipe.passes[0][1].overrides == {"re:" + pattern: {"bits": 8}}
    started = time.monotonic()  # module names that nearly match, 256 characters: the worst a checked one gets
    for name in ("a" * 255 + "!", "ab" * 128, "a." * 128, "1" * 256, "blocks.0." * 28):
        re.search(pattern, name)
    assert time.monotonic() - started < 5


def test_presets_patterns_pass_the_backtracking_check():
    from compressor.recipes import PRESETS

    for name in PRESETS:
        assert isinstance(resolve_recipe(name), Recipe)


REGEX_PIECES = st.sampled_from(["a", "b", ".", r"\w", r"\d", "[ab]", "[^b]", "(", ")", "(?:", "|", "*", "+", "?",
                                "{2,5}", "{3}", "*?", "$", "^", r"\b", "(?=", "(?!", r"\1", "(?i)", "++", "(?>"])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(REGEX_PIECES, max_size=16))
def test_property_backtracking_check_never_fails(pieces):
    """Whatever the pattern (compilable or not), the check returns None or one short line; never raises."""
    from compressor.regex_safety import regex_backtracking_problem

    problem = regex_backtracking_problem("".join(pieces))
    assert problem is None or _short_line(problem)


# ------------------------------------------------------------------------------------- an artifact to tamper with

@pytest.fixture(scope="module")
def fp32_run(shared_run) -> Path:
    """`compress run gpt-xs` (fp32): model.onnx with the compressor metadata, and its report.json (a run other test
    files read too: tamper with copies)."""
    return shared_run("gpt-xs fp32").out


def _with_metadata(source: Path, target: Path, **changes: str | None) -> Path:
    """A copy of `source` whose compressor.<key> metadata entries are replaced (None: removed)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(f"compressor.{key}", None)
        if value is not None:
            props[f"compressor.{key}"] = value
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    target.write_bytes(model.SerializeToString())
    return target


def _custom_op(source: Path, target: Path) -> Path:
    """The graph's output passed through an op of a domain neither the checker nor ONNX Runtime knows."""
    model = onnx.load(str(source))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["before_custom" if o == output else o for o in node.output]
    model.graph.node.append(helper.make_node("Frobnicate", ["before_custom"], [output], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    target.write_bytes(model.SerializeToString())
    return target


def _gpt_config(**changes) -> str:
    return json.dumps({"context": 128, "dropout": 0.0, "heads": 4, "layers": 2, "mlp_hidden": None,
                       "vocab_size": 256, "width": 64, **changes})


# ------------------------------------------------------------------------------------------------ compress check

def _baseline(run: Path, folder: Path, edit) -> Path:
    report = json.loads((run / "report.json").read_text())
    edit(report)
    path = folder / "baseline.json"
    path.write_text(json.dumps(report))
    return path


def _set(*keys, value):
    def edit(report):
        node = report
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def test_check_refuses_tampered_baselines(fp32_run, tmp_path):
    artifact = fp32_run / "model.onnx"
    cases = [
        (_set("accuracy", "onnxruntime", "cpu", value="9.29"), "accuracy.onnxruntime.cpu must be a finite perplexity"),
        (_set("accuracy", "onnxruntime", "cpu", value=0), "> 0, not 0"),
        (_set("accuracy", "onnxruntime", "cpu", value=None), "not None"),
        (_set("accuracy", "onnxruntime", "cpu", value=float("nan")), "not nan"),
        (_set("accuracy", "onnxruntime", "cpu", value=True), "not True"),
        (_set("accuracy", "heldout_examples", value="8"), "accuracy.heldout_examples must be an integer in 1..1,000,000"),
        (_set("accuracy", "heldout_examples", value=0), "heldout_examples must be an integer"),
        (_set("accuracy", "heldout_examples", value=-3), "heldout_examples must be an integer"),
        (_set("accuracy", "heldout_examples", value=8.5), "heldout_examples must be an integer"),
        (_set("accuracy", "heldout_examples", value=True), "heldout_examples must be an integer"),
        (_set("accuracy", "heldout_examples", value=10**9), "heldout_examples must be an integer"),
        (_set("accuracy", "metric", value="bleu"), "accuracy.metric 'bleu' is not a metric this version knows"),
        (_set("accuracy", "metric", value=["perplexity"]), "is not a metric this version knows"),
        (_set("accuracy", "metric", value="exact_match"), "must be a finite exact_match in [0, 1]"),
        (_set("accuracy", "onnxruntime", value=[]), "not a compress report.json"),
        (lambda report: report.clear(), "not a compress report.json"),
    ]
    for edit, needle in cases:
        baseline = _baseline(fp32_run, tmp_path, edit)
        message = _user_error(lambda: check_artifact(artifact, baseline))
        assert needle in message, (needle, message)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not valid JSON" in _user_error(lambda: check_artifact(artifact, tmp_path / "deep.json"))


def test_check_refuses_tampered_artifacts(fp32_run, tmp_path):
    source, baseline = fp32_run / "model.onnx", fp32_run / "report.json"
    cases = [
        ({"family": "bert"}, "compressor.family 'bert' is not a model family this version knows"),
        ({"family": "x" * 10_000}, "is not a model family"),
        ({"model_config": "{oops"}, "compressor.model_config is not valid JSON"),
        ({"model_config": "[1, 2]"}, "compressor.model_config must be a JSON object, not [1, 2]"),
        ({"model_config": "[" * 100_000}, "not valid JSON"),
        ({"model_config": _gpt_config(context=10**9)}, "context must be an integer in 1..65,536, not 1000000000"),
        ({"model_config": _gpt_config(context="128")}, "context must be an integer"),
        ({"model_config": _gpt_config(context=1000)}, "ONNX Runtime failed to run the model"),  # past its positions
        ({"family": "seq2seq", "model_config": json.dumps({"max_length": 13})}, "exact_match"),  # metric differs
        ({"family": None}, "was not written by `compress run`"),
    ]
    for changes, needle in cases:
        artifact = _with_metadata(source, tmp_path / "tampered.onnx", **changes)
        message = _user_error(lambda: check_artifact(artifact, baseline))
        assert needle in message, (changes, message)
    custom = _custom_op(source, tmp_path / "custom.onnx")
    assert "ONNX Runtime cannot load the model" in _user_error(lambda: check_artifact(custom, baseline))


def test_check_task_state_is_validated(tmp_path):
    """The sentence-embedding task restores its probe from compressor.task_state (no tiny encoder run needed)."""
    from compressor.check import _task_state
    from compressor.tasks import sentence_embedding

    session = SimpleNamespace(get_outputs=lambda: [SimpleNamespace(shape=["batch", 4])])

    def restore(state: str):
        data = sentence_embedding.EmbeddingData(batches=[], labels=np.zeros(0), config={})
        _task_state(tmp_path / "a.onnx", sentence_embedding, data, {"compressor.task_state": state}, session)
        return data

    for state, needle in [("{oops", "compressor.task_state is not valid JSON"), ("[1]", "must be a JSON object"),
                          ("{}", "does not hold what its task needs"), ('{"probe": "abc"}', "does not hold"),
                          ('{"probe": [[1], [2, 3]]}', "does not hold"), ('{"probe": [1, 2]}', "no usable probe"),
                          ('{"probe": [NaN, 1, 2, 3, 4]}', "no usable probe")]:
        assert needle in _user_error(lambda: restore(state)), state
    assert "lacks compressor.task_state" in _user_error(
        lambda: _task_state(tmp_path / "a.onnx", sentence_embedding, None, {}, session))
    assert len(restore(json.dumps({"probe": [0.1, 0.2, 0.3, 0.4, 0.5]})).probe) == 5


def test_check_paths_tolerance_and_sha256(fp32_run, tmp_path):
    artifact, baseline = fp32_run / "model.onnx", fp32_run / "report.json"
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "baseline is not a file" in _user_error(lambda: check_artifact(artifact, fifo))
    assert "baseline is not a file" in _user_error(lambda: check_artifact(artifact, tmp_path))
    assert "artifact is not a file" in _user_error(lambda: check_artifact(fifo, baseline))
    for tolerance in (float("nan"), float("inf"), -1.0):
        assert "--tolerance must be a finite number >= 0" in _user_error(
            lambda: check_artifact(artifact, baseline, tolerance))
    same = check_artifact(artifact, baseline)
    assert same.passed and same.same_artifact is True and "different artifact" not in same.line()
    other = check_artifact(artifact, _baseline(fp32_run, tmp_path, _set("artifact", "sha256", value="0" * 64)))
    assert other.passed and other.same_artifact is False  # reported, not failed
    assert other.line().endswith("(a different artifact than the baseline's)")
    unknown = check_artifact(artifact, _baseline(fp32_run, tmp_path, lambda report: report.pop("artifact")))
    assert unknown.same_artifact is None and "different artifact" not in unknown.line()


def test_check_through_the_cli(fp32_run, tmp_path):
    """click's runner (in-process): the CLI's exit code and stderr, without a process start-up per case."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    artifact = str(fp32_run / "model.onnx")
    for tolerance in ("nan", "inf"):  # the option's FloatRange(min=0) lets both through
        line = _one_line_error(_cli("check", artifact, "--baseline", str(fp32_run / "report.json"), "--tolerance",
                                    tolerance))
        assert line == f"error: --tolerance must be a finite number >= 0, not {tolerance}"
    assert "not a file" in _one_line_error(_cli("check", artifact, "--baseline", str(fifo)))
    bad = _baseline(fp32_run, tmp_path, _set("accuracy", "heldout_examples", value=8.5))
    assert "heldout_examples" in _one_line_error(_cli("check", artifact, "--baseline", str(bad)))
    tampered = _with_metadata(fp32_run / "model.onnx", tmp_path / "t.onnx", family="bert")
    assert "'bert'" in _one_line_error(_cli("check", str(tampered), "--baseline", str(fp32_run / "report.json")))


# ----------------------------------------------------------------------------------------------------- ONNX inputs

def test_onnx_inputs_with_tampered_metadata(fp32_run, tmp_path):
    source = fp32_run / "model.onnx"
    cases = [
        ({"model_config": "{oops"}, "compressor.model_config is not valid JSON"),
        ({"model_config": '"a string"'}, "compressor.model_config must be a JSON object, not 'a string'"),
        ({"model_config": json.dumps({"context": 1, "vocab_size": 2**70})}, "vocab_size must be an integer"),
        ({"family": "bert"}, "compressor.family 'bert' is not a model family this version knows"),
        ({"family": "seq2seq"}, "lacks 'max_length'"),
        ({"family": "seq2seq", "model_config": json.dumps({"max_length": 13})},
         "the graph's inputs (['input_ids']) are not those of its family's task (src_ids, tgt_ids)"),
        ({"family": "hf-encoder", "model_config": json.dumps({"max_length": 13, "vocab_size": 9,
                                                              "tokenizer": "/no/such/folder"})},
         "tokenizer must name the folder"),
        ({"model_config": _gpt_config(context=10**9)}, "context must be an integer in 1..65,536, not 1000000000"),
        ({"model_config": _gpt_config(max_length=10**9)}, "max_length must be an integer"),
        ({"model_config": _gpt_config(context=True)}, "context must be an integer"),
        ({"model_config": _gpt_config(context=1000)}, "ONNX Runtime failed to run the model on its task's inputs"),
        ({"model_config": _gpt_config(vocab_size=100_000)}, "does compressor.model_config match the graph?"),
        ({"model_config": None}, "carries no compressor task metadata"),
    ]
    for index, (changes, needle) in enumerate(cases):
        model = _with_metadata(source, tmp_path / f"in{index}.onnx", **changes)
        out = tmp_path / f"out{index}"
        line = _one_line_error(_cli("run", str(model), "--out", str(out), "--recipe", "int4", *FAST))
        assert needle in line, (changes, line)
        assert not out.exists()  # failed before --out was created


def test_onnx_input_ort_cannot_run_and_own_int4_artifact(fp32_run, tmp_path):
    custom = _custom_op(fp32_run / "model.onnx", tmp_path / "custom.onnx")
    out = tmp_path / "out"
    line = _one_line_error(_cli("run", str(custom), "--out", str(out), "--recipe", "int4"))
    assert "ONNX Runtime cannot load the model" in line and "Frobnicate" in line and not out.exists()
    # our own int4 artifact fed back as an input
    int4 = tmp_path / "int4"
    done = _cli("run", str(fp32_run / "model.onnx"), "--out", str(int4), "--recipe", "int4", *FAST)
    assert done.exit_code == 0, done.output
    line = _one_line_error(_cli("run", str(int4 / "model.onnx"), "--out", str(out), "--recipe", "int4"))
    assert "has no MatMul with a 2-D fp32 weight" in line and not out.exists()


def test_test_file_helpers_can_fail():
    """The checks above would notice a traceback, a second line or a long message."""
    with pytest.raises(AssertionError):
        _short_line("two\nlines")
    with pytest.raises(AssertionError):
        _short_line("x" * MAX_MESSAGE)
    with pytest.raises(AssertionError):
        _one_line_error(SimpleNamespace(returncode=3, stdout="", stderr="bug: unexpected TypeError"))
    with pytest.raises(AssertionError):
        _one_line_error(SimpleNamespace(returncode=2, stdout="", stderr="Traceback\nerror: x"))
    with pytest.raises(TypeError):  # the property lets any other exception through, failing the test
        _holds(lambda: sorted([1, "zz"]))
    with pytest.raises(AssertionError):
        _holds(lambda: "not a recipe")
