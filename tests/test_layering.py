"""Layering: serving depends on exported model artifacts (models/), never on training code.

Merlin-style rule (issue 18): what a served model is and how it is loaded lives in models/, which training
writes and serving reads. These tests parse the source with `ast` (no imports run), so an import inside a
function counts as much as one at module level, and `importlib.import_module("...")` with a literal name
counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# models/ is the shared leaf: it may use features/ (the registry of ranker features), never the layers above it
MODELS_MUST_NOT_IMPORT = ("training", "serving", "orchestration", "assets")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, in_functions: bool) -> list[ast.AST]:
    """Every node, or (in_functions=False) only those that run when the module is imported."""
    if in_functions:
        return list(ast.walk(tree))
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [c for c in ast.iter_child_nodes(node)
                 if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    return out


def imported_modules(path: Path, module_name: str | None = None, in_functions: bool = True) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file: module level and (by default) in functions,
    relative ones resolved, and importlib.import_module / __import__ calls with a literal name. For
    `from a import b` both `a` and `a.b` are listed (b may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module_name or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: list[tuple[int, str]] = []
    for node in _nodes(tree, in_functions):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}".lstrip(".")) for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found: dict[str, str] = {}  # one entry per import statement (its module, not each imported name)
    for path in _modules(package):
        for line, module in imported_modules(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module.split(".")[0] in forbidden and where not in found:
                found[where] = module
    return [f"{where} imports {module}" for where, module in found.items()]


def test_the_scanner_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The rule is only as good as its parser: an import hidden in a function or written relatively counts."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from training.registry import load_alias\n    from ..training import two_tower\n"
                     "    import importlib\n    importlib.import_module('training.rollout')\n")
    found = {m for _, m in imported_modules(probe, "serving.probe")}
    assert {"training.registry", "training", "training.two_tower", "training.rollout"} <= found


def test_serving_never_imports_training() -> None:
    offenders = _offenders("serving", ("training",))
    assert not offenders, "serving must load models through models/, not training code:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", ["models"])
def test_models_imports_no_layer_above_it(package: str) -> None:
    assert _modules(package), f"{package}/ has no modules"
    offenders = _offenders(package, MODELS_MUST_NOT_IMPORT)
    assert not offenders, f"{package}/ must not depend on {', '.join(MODELS_MUST_NOT_IMPORT)}:\n" + "\n".join(offenders)


def test_importing_serving_loads_no_training_module() -> None:
    """Following the imports that run at import time from every serving module (through models/, features/,
    ...) never reaches training/: a server process holds no training code until something calls into it
    (and serving itself never does, test above)."""
    first_party = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"tests"}
    files = {_module_name(p): p for pkg in first_party for p in _modules(pkg)}
    seen: dict[str, str] = {}
    todo = [(name, name) for name in files if name.split(".")[0] == "serving"]
    while todo:
        name, via = todo.pop()
        if name in seen:
            continue
        seen[name] = via
        for _, module in imported_modules(files[name], in_functions=False):
            parts = module.split(".")
            # `from a.b import c`: c may be a module (a.b.c) or a name in a.b; follow whichever file exists
            for k in range(len(parts), 0, -1):
                target = ".".join(parts[:k])
                if target in files:
                    todo.append((target, f"{via} -> {target}"))
                    break
    reached = sorted(via for name, via in seen.items() if name.split(".")[0] == "training")
    assert not reached, "serving reaches training code through:\n" + "\n".join(reached)


def test_every_product_package_is_in_the_layers_contract() -> None:
    """import-linter (`make lint`) only checks the packages its contract names: a new top-level package must be
    given a layer, and the packaged list (pyproject, the zip shipped to Spark executors) must name the same ones."""
    import tomllib

    from lake.spark_conf import PRODUCT_PACKAGES

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = config["tool"]["importlinter"]
    layered = {name.strip() for layer in contract["contracts"][0]["layers"] for name in layer.split("|")}
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
    assert set(contract["root_packages"]) == layered == on_disk
    assert set(config["tool"]["setuptools"]["packages"]) == set(PRODUCT_PACKAGES) == on_disk


# Modules that touch the process environment (os.environ / os.getenv), each with why. Everything else gets its
# configuration passed down from a settings object built at its entry point (issue 18): a new reader must either
# go into one of these settings objects or be added here with a reason.
ENVIRONMENT_MODULES: dict[str, str] = {
    "ground/settings.py": "Settings / SparkSettings / LakeStorageSettings / EmbeddedRedisSettings / "
                          "RedisConnectionSettings / PrivacySettings.from_env",
    "serving/settings.py": "ServeSettings.from_env(env=os.environ)",
    "serving/rerank.py": "RerankConfig.from_env(env=os.environ)",
    "serving/experiments.py": "Experiment.from_env(env=os.environ), called by ServeSettings.from_env",
    "streaming/options.py": "StreamJobOptions.from_env / options_from_args(env=os.environ)",
    "monitoring/health.py": "FreshnessThresholds.from_env(env=os.environ)",
    "orchestration/sensors.py": "SensorSettings.from_env(env=os.environ), per tick",
    "orchestration/definitions.py": "EnvVar for the resource variables that are set",
    "orchestration/cli.py": "the entry point: the environment of the processes it starts (KAIROS_HOME, DAGSTER_HOME, ...)",
    "orchestration/services.py": "the environment of the child services it starts",
    "serving/server.py": "the environment of the BentoML server process it starts",
    "compliance/lineage.py": "DAGSTER_HOME (set by the CLI) locates the Dagster instance",
    "ground/jvm.py": "JAVA_HOME / PYSPARK_PYTHON / PYARROW_IGNORE_TIMEZONE: pyspark reads them from os.environ only",
    "lake/spark_read.py": "the AWS_*/AZURE_*/GOOGLE_* handed to executors",
}


def test_only_settings_and_entry_points_touch_the_environment() -> None:
    product = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
    found: set[str] = set()
    for path in (p for pkg in product for p in _modules(pkg)):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv", "putenv", "unsetenv")
               and isinstance(n.value, ast.Name) and n.value.id in ("os", "_os") for n in ast.walk(tree)) \
                or any(isinstance(n, ast.ImportFrom) and n.module == "os"
                       and any(a.name in ("environ", "getenv") for a in n.names) for n in ast.walk(tree)):
            found.add(str(path.relative_to(ROOT)))
    assert found <= set(ENVIRONMENT_MODULES), f"environment read outside the settings objects: {sorted(found - set(ENVIRONMENT_MODULES))}"
    assert not set(ENVIRONMENT_MODULES) - found, f"no longer reads the environment: {sorted(set(ENVIRONMENT_MODULES) - found)}"


HOUR = 3_600_000
# (Config, dataclass, the asset's own switches, launchpad field -> (dataclass field path, launchpad unit in the
# dataclass's), launchpad defaults the asset sets on purpose instead of the dataclass's). Written here by hand so a
# generated class that maps a knob to another field or unit fails.
MIRRORS = [
    ("assets.training:GateSettings", "training.gates:GateConfig", {"auto_promote"}, {}, {}),
    ("assets.training:TwoTowerTrainConfig", "training.two_tower_config:TwoTowerConfig", set(), {}, {}),
    ("assets.training:RankerTrainConfig", "training.ranker:RankerConfig", {"use_tuned_params"}, {}, {}),
    ("assets.features:TrainingSetConfig", "training.dataset:SplitConfig", set(), {}, {}),
    ("assets.ingestion:RefineSettings", "ingestion.refine:RefineConfig",
     {"dedup_lookback_days", "max_quarantine_rate", "engine", "spark_min_events"},
     {"dedup_window_seconds": ("dedup_window_ms", 1000), "bot_filter": ("bots.enabled", 1),
      "bot_max_clicks": ("bots.max_clicks", 1), "bot_window_seconds": ("bots.window_ms", 1000),
      "bot_max_median_dwell_ms": ("bots.max_median_dwell_ms", 1), "max_future_skew_seconds": ("max_future_skew_ms", 1000)},
     {}),
    # LabelConfig's 0.0 = no catalog negatives (monitoring's attribution, the test fixture); training sets need them
    ("assets.ingestion:LabelSettings", "ingestion.labels:LabelConfig", {"engine", "spark_min_events"},
     {"attribution_window_hours": ("attribution_window_ms", HOUR)},
     {"easy_negative_ratio": 2.0, "negative_popularity_alpha": 0.5}),
    ("assets.rollout:ShadowSettings", "training.rollout:ShadowGuardrails", set(),
     {"min_overlap_at_10": ("min_overlap_at_k", 1)}, {}),
    ("assets.rollout:CanarySettings", "training.rollout:Guardrails", {"click_window_minutes"}, {}, {}),
    ("assets.monitoring:DriftConfig", "monitoring.drift:DriftThresholds",
     {"recent_days", "min_sessions", "min_served_rows", "max_reference_rows", "ranker_psi_drives_status", "seed"},
     {"warn_psi": ("warn", 1), "act_psi": ("act", 1)}, {}),
    ("assets.monitoring:ServedHealthConfig", "ingestion.labels:LabelConfig", {"window_days"},
     {"attribution_window_hours": ("attribution_window_ms", HOUR)}, {}),
    ("assets.monitoring:OPEConfig", "ingestion.labels:LabelConfig",
     {"window_days", "epsilon", "explore_from", "temperature", "max_weight", "n_bootstrap", "seed"},
     {"attribution_window_hours": ("attribution_window_ms", HOUR)}, {}),
]


def _load(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _at(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("config_path, dataclass_path, extras, units, overrides", MIRRORS)
def test_a_dagster_config_mirror_keeps_its_dataclass_defaults(config_path: str, dataclass_path: str, extras: set[str],
                                                               units: dict, overrides: dict) -> None:
    """A Dagster Config exposing a product dataclass's knobs names only that dataclass's fields (plus the
    asset's own switches) with the dataclass's defaults in the launchpad's unit (a None shown as a negative
    sentinel), except the asset's declared overrides: a default changed in one place fails here."""
    import dataclasses

    config, dc = _load(config_path), _load(dataclass_path)
    defaults = {f.name: f.default for f in dataclasses.fields(dc)}
    same_name = {k: v.default for k, v in config.model_fields.items() if k not in extras and k not in units
                 and k not in overrides}
    assert set(same_name) <= set(defaults), f"{config.__name__} names fields {dc.__name__} does not have"
    sentinels = {k for k, v in same_name.items() if defaults[k] is None and isinstance(v, float) and v < 0}
    assert {k: v for k, v in same_name.items() if k not in sentinels} == {k: defaults[k] for k in same_name
                                                                          if k not in sentinels}
    assert extras <= set(config.model_fields), f"{config.__name__} lost a switch"
    instance = dc()
    for name, field in config.model_fields.items():
        if name in extras:
            continue
        path, scale = units.get(name, (name, 1))
        want = _at(instance, path)
        if name in overrides:
            assert field.default == overrides[name] != want / scale, f"{name}: not the declared asset default"
        elif want is None:
            assert field.default is None or field.default < 0, f"{name}: {dc.__name__}'s None shown as {field.default}"
        else:
            assert field.default * scale == want and type(field.default) is field.annotation, f"{name}: {field}"


@pytest.mark.parametrize("config_path, dataclass_path, extras, units, overrides", MIRRORS)
def test_a_run_config_becomes_its_dataclass_in_the_dataclass_units(config_path: str, dataclass_path: str,
                                                                   extras: set[str], units: dict, overrides: dict) -> None:
    """`to_dataclass` of the default run config is the dataclass's defaults (plus the declared overrides), and a
    changed launchpad value lands in its field scaled to the dataclass's unit (an int field stays int; a negative
    sentinel becomes None, a zero stays a threshold)."""
    from assets.config import to_dataclass

    config, dc = _load(config_path), _load(dataclass_path)
    built = to_dataclass(config(), dc)
    instance = dc()
    for name, field in config.model_fields.items():
        if name in extras:
            continue
        path, scale = units.get(name, (name, 1))
        want = overrides[name] * scale if name in overrides else _at(instance, path)
        assert _at(built, path) == want, f"{name}: the default run config gives {_at(built, path)!r}, not {want!r}"
        default, sentinel = field.default, _at(instance, path) is None and isinstance(field.default, float)
        changed = (not default if isinstance(default, bool) else 0.0 if sentinel
                   else default + 3 if isinstance(default, int) else default + 0.25 if isinstance(default, float)
                   else None)
        if changed is None:
            continue
        got = _at(to_dataclass(config(**{name: changed}), dc), path)
        assert got == changed * scale and type(got) is type(_at(instance, path) if _at(instance, path) is not None
                                                            else changed), f"{name}={changed!r} -> {got!r}"
        if sentinel:
            assert _at(to_dataclass(config(**{name: -1.0}), dc), path) is None
