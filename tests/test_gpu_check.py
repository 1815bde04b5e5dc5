"""The prepared GPU check (issue 23): ``--quick --device cpu`` runs every part as on a bare GPU machine, its JSON
follows its schema, the budget and failures are recorded, and the wheel list is what the check imports.

One quick run, in a subprocess that sees only what the lent GPU machine will have: the GPU image
(``benchmarks.gpu_wheels.GPU_IMAGE`` and their dependencies) and ``gpu_wheels.WHEELS`` (``python -S`` with a path
of links to those distributions alone). The run must complete there, and every wheel of the list must have been
imported (none carried for nothing).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from benchmarks import gpu_check, gpu_wheels
from benchmarks.common import Report, Table, Target
from conftest import REPO_ROOT

# runs the quick check and prints the top-level modules it imported
_RUN = r"""
import json, runpy, sys
sys.argv = ["gpu_check", "--quick", "--device", "cpu", "--output", sys.argv[1], "--budget-s", "3600"]  # no cut on a busy machine
try:
    runpy.run_module("benchmarks.gpu_check", run_name="__main__")
finally:
    print("MODULES " + json.dumps(sorted({name.partition(".")[0] for name in list(sys.modules)})))
"""


def _gpu_machine_site(folder: Path, allowed: set[str]) -> None:
    """Links into ``folder`` the top-level modules (and metadata) of the installed distributions in ``allowed``:
    on a path holding only this folder, every other third-party module is absent, as on the GPU machine."""
    for distribution in importlib.metadata.distributions():
        if gpu_wheels.normalise(distribution.metadata["Name"]) not in allowed:
            continue
        for top in {Path(str(file)).parts[0] for file in distribution.files or ()}:
            source = Path(distribution.locate_file(top))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and source.exists():
                if not (folder / top).exists():
                    (folder / top).symlink_to(source)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output, site = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("site")
    allowed = gpu_wheels.image_distributions() | {gpu_wheels.normalise(name) for name in gpu_wheels.WHEELS}
    _gpu_machine_site(site, allowed)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{site}"}
    result = subprocess.run([sys.executable, "-S", "-c", _RUN, str(output)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    modules = json.loads(result.stdout.rsplit("MODULES ", 1)[1])
    return {"output": output, "stdout": result.stdout, "modules": modules,
            "record": json.loads((output / "gpu_check.json").read_text())}


def test_quick_cpu_run_completes_every_part_with_the_gpu_machines_packages(quick_run: dict) -> None:
    record = quick_run["record"]
    assert record["finished"] and record["quick"]
    statuses = {part["name"]: part["status"] for part in record["parts"]}
    assert list(statuses) == [name for name, *_ in gpu_check.PARTS]
    reasons = {part["name"]: part["reason"] for part in record["parts"]}
    assert all(status == "done" for name, status in statuses.items() if name != "multi_gpu"), reasons
    assert statuses["multi_gpu"] == "skipped" and "at least 2" in reasons["multi_gpu"]
    parts = {part["name"]: part for part in record["parts"]}
    for name in ("pretrain", "synchronisations", "augmentation", "pretrain_vit", "inference"):
        assert parts[name]["figures"] and parts[name]["tables"], name
    pretrain = parts["pretrain"]["figures"]
    assert pretrain["lvmmed_iterations_timed"] >= 2 and pretrain["ntxent_iterations_timed"] >= 2
    assert pretrain["lvmmed_s_per_iteration"] > 0 and "statistic match_accuracy" in pretrain
    finite = [t for t in parts["pretrain"]["targets"] if "finite" in t["name"]]
    assert [t["verdict"] for t in finite] == ["met"] * 3, finite  # loss, per-path gradient norms, all statistics
    assert "statistic gradient_norms.vertex" in pretrain  # read from the objective without naming it here
    assert parts["synchronisations"]["figures"]["objective_operator_calls"] > 0
    assert parts["pretrain_vit"]["figures"]["batch_size"] >= 2
    # nothing is judged in a quick run: its sizes are not the targets'
    judged = [t for part in record["parts"] for t in part["targets"]
              if t["verdict"] != "not judged" and "finite" not in t["name"]]
    assert judged == []
    # printed as it goes, and the Markdown holds the summary
    stdout = quick_run["stdout"]
    assert stdout.index("## warm_up") < stdout.index("## pretrain") < stdout.index("## inference")
    markdown = (quick_run["output"] / "gpu_check.md").read_text()
    assert "### Targets" in markdown and "| multi_gpu" in markdown


def test_the_record_follows_its_schema(quick_run: dict) -> None:
    record = quick_run["record"]
    jsonschema.validate(record, gpu_check.SCHEMA)
    broken = json.loads(json.dumps(record))
    broken["parts"][0]["status"] = "ok"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, gpu_check.SCHEMA)
    del broken["machine"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, gpu_check.SCHEMA)


def test_the_wheel_list_is_what_the_check_imports_beyond_the_gpu_image(quick_run: dict) -> None:
    owners = importlib.metadata.packages_distributions()
    image = gpu_wheels.image_distributions()
    needed = set()
    for module in quick_run["modules"]:
        distributions = {gpu_wheels.normalise(name) for name in owners.get(module, ())}
        if distributions and not distributions & image:
            needed |= distributions
    wheels = {gpu_wheels.normalise(name) for name in gpu_wheels.WHEELS}
    assert wheels == needed, f"imported beyond the GPU image: {sorted(needed)}; WHEELS: {sorted(wheels)}"
    assert "itk" not in wheels and "torch" not in wheels


def test_pins_follow_requirements() -> None:
    pinned = dict(pin.split("==") for pin in gpu_wheels.pins())
    requirements = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            requirements[gpu_wheels.normalise(name)] = version.strip()
    for name, version in pinned.items():
        assert version == requirements.get(gpu_wheels.normalise(name), version), name
    with pytest.raises(ValueError, match="no-such-package"):
        gpu_wheels.pins(("no-such-package",))


def test_the_wheel_folder_when_present_holds_the_list() -> None:
    folder = REPO_ROOT / ".gpu-wheels"
    if not folder.is_dir():
        pytest.skip("no .gpu-wheels/ here (make gpu-wheels downloads it)")
    found = {gpu_wheels.normalise(wheel.name.split("-")[0]): wheel.name for wheel in folder.glob("*.whl")}
    for pin in gpu_wheels.pins():
        name, version = pin.split("==")
        assert gpu_wheels.normalise(name) in found, pin
        wheel = found[gpu_wheels.normalise(name)]
        assert f"-{version}-" in wheel and ("cp312" in wheel or "py3-none-any" in wheel or "py2.py3" in wheel), wheel
    assert sum(wheel.stat().st_size for wheel in folder.glob("*.whl")) < 32 * 2**20


def test_the_script_keeps_the_machines_torch() -> None:
    script = (REPO_ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    assert "--system-site-packages" in script and "--no-index --no-deps" in script
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    installs = [line for line in code if " install " in line]
    assert installs and all("torch" not in line and " -r " not in line for line in installs)
    assert not any("torch==" in line for line in code)


@pytest.mark.slow  # a virtualenv, a pip install and a check run: about a minute on 2 cores
def test_the_script_runs_the_check_from_the_wheels_alone(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh on a Python whose own packages are the GPU image's only (this interpreter's version,
    the image's distributions linked onto PYTHONPATH): it installs the carried wheels and runs the check."""
    wheels = REPO_ROOT / ".gpu-wheels"
    python = Path("/usr/bin/python3")
    if not any(wheels.glob("*.whl")):
        pytest.skip("no .gpu-wheels/ here (make gpu-wheels downloads it)")
    version = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True) if python.exists() else None
    if version is None or version.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{python} is not a Python {sys.version_info[:2]} (the linked binary modules need the same)")
    # the cp312 wheels (pillow) do not install on this Python: linked from here instead, like the image's packages
    carried, binary = tmp_path / "wheels", set()
    carried.mkdir()
    for wheel in wheels.glob("*.whl"):
        if wheel.name.endswith("-none-any.whl"):
            (carried / wheel.name).symlink_to(wheel)
        else:
            binary.add(gpu_wheels.normalise(wheel.name.split("-")[0]))
    site = tmp_path / "site"
    site.mkdir()
    _gpu_machine_site(site, gpu_wheels.image_distributions() | binary)
    environment = {**os.environ, "PYTHON": str(python), "PYTHONPATH": str(site), "OUT": str(tmp_path / "out"),
                   "GPU_WHEELS": str(carried), "GPU_VENV": str(tmp_path / "venv"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick", "--device", "cpu", "--only", "warm_up",
                             "augmentation"], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [part["status"] for part in record["parts"]] == ["done", "done"]
    assert f"check torch {torch.__version__}" in result.stdout  # the machine's torch, not one installed


def _fake_part(behaviour: str):
    def part(context: gpu_check.Context, result: gpu_check.PartResult) -> Report:
        if behaviour == "fail":
            raise ValueError("the fake part's error")
        if behaviour == "hang":
            time.sleep(60)
        report = Report(result.title, tables=[Table("t", ["a"], [["1"]])], figures={"value": 1.0})
        report.targets.append(Target("fake", "1", ">= 1", context.verdict(True)))
        return report

    return part


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "PARTS", (
        ("warm_up", "fails", _fake_part("fail"), None),
        ("pretrain", "works", _fake_part("work"), 1.0),
    ))
    lines: list[str] = []
    check = gpu_check.run_check(torch.device("cpu"), True, tmp_path, 60.0, echo=lines.append)
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    jsonschema.validate(record, gpu_check.SCHEMA)
    failed, done = record["parts"]
    assert failed["status"] == "failed" and failed["reason"].startswith("ValueError: the fake part's error")
    assert done["status"] == "done" and done["figures"] == {"value": 1.0}
    assert check.finished and "the fake part's error" in (tmp_path / "gpu_check.md").read_text()


def test_the_budget_interrupts_a_part_and_skips_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "PARTS", (
        ("warm_up", "hangs", _fake_part("hang"), None),
        ("pretrain", "never reached", _fake_part("work"), 1.0),
    ))
    started = time.perf_counter()
    gpu_check.run_check(torch.device("cpu"), True, tmp_path, 5.5, echo=lambda text: None)
    assert time.perf_counter() - started < 30
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    hung, skipped = record["parts"]
    assert hung["status"] == "cut" and "time budget" in hung["reason"]
    assert skipped["status"] == "skipped" and "budget is spent" in skipped["reason"]
    with pytest.raises(ValueError, match="budget"):
        gpu_check.run_check(torch.device("cpu"), True, tmp_path, 0.0)
    with pytest.raises(ValueError, match="unknown parts"):
        gpu_check.run_check(torch.device("cpu"), True, tmp_path, 10.0, only=("nope",))


def test_objective_statistics_are_read_generically() -> None:
    class Objective(torch.nn.Module):
        last_match_accuracy = torch.tensor(0.5)
        last_gradient_norms = {"vertex": torch.tensor(1.0), "edge": 2.0}
        last_flag = True  # not a number: left out
        other = 3.0  # not a statistic

    assert gpu_check.objective_statistics(Objective()) == {
        "match_accuracy": 0.5, "gradient_norms.vertex": 1.0, "gradient_norms.edge": 2.0}


def test_the_vit_batch_is_the_largest_that_fits_in_the_workflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = []

    def fits(context: gpu_check.Context, batch: int) -> bool:
        probed.append(batch)
        return batch <= 8

    def workflow(context: gpu_check.Context, batch: int, iterations: int) -> tuple[list[float], float | None, int]:
        if batch > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [0.5] * iterations, 1000.0, 1024

    monkeypatch.setattr(gpu_check, "_vit_step_fits", fits)
    monkeypatch.setattr(gpu_check, "_vit_workflow", workflow)
    context = gpu_check.Context(torch.device("cuda"), quick=False, scratch=tmp_path)
    report = gpu_check.part_pretrain_vit(context, gpu_check.PartResult("pretrain_vit", "ViT"))
    assert probed == [2, 4, 8, 16]  # doubled until the first step that does not fit
    assert report.figures["batch_size"] == 4 and report.figures["s_per_iteration"] == 0.5
    assert "8 in the workflow: out of memory" in report.render()
