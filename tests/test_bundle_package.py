"""Model-zoo packaging, installation through MONAI's own commands, hash-checked large files, safe extraction, and
the checks of the model zoo's CI (``ci/verify_bundle.py`` of Project-MONAI/model-zoo) on the installed archive."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.utils import HashCheckError, extractall
from monai.bundle import download, download_large_files

from bundle.install import UnsafeArchiveError, check_archive_members, install_bundle
from bundle.large_files import LargeFilesError, check_large_files, file_digest, read_large_files, record_digests
from bundle.package import PackagingError, build_package, bundle_name, bundle_version, main
from conftest import REPO_ROOT, SHARED
from zoo_staging import staged_bundle

META_SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_large_files(root: Path, entries: list[dict]) -> None:
    lines = ["large_files:" if entries else "large_files: []"]
    for entry in entries:
        lines.append(f'  - path: "{entry["path"]}"')
        lines.extend(f'    {key}: "{entry[key]}"' for key in ("url", "hash_type", "hash_val") if key in entry)
    (root / "large_files.yml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def small_bundle(tmp_path: Path) -> Path:
    """A minimal bundle tree with the clutter a working copy has: caches, runs, data, a virtualenv, weights."""
    root = tmp_path / "src"
    (root / "configs").mkdir(parents=True)
    metadata = {"name": "Tiny-Bundle", "version": "0.2.0", "changelog": {"0.2.0": "second", "0.1.0": "first"}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (root / "configs" / "inference.json").write_text("{}")
    (root / "LICENSE").write_text("Apache-2.0")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("# Tiny")
    (root / "scripts" / "__pycache__").mkdir(parents=True)
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (root / "models").mkdir()
    torch.save({"w": torch.zeros(2)}, root / "models" / "model.pt")
    for clutter in (".venv/lib/x.py", "runs/log.txt", "data/image.png", "tests/test_x.py", ".git/HEAD"):
        (root / clutter).parent.mkdir(parents=True, exist_ok=True)
        (root / clutter).write_text("x")
    _write_large_files(root, [{"path": "models/model.pt", "url": "file:///nowhere/model.pt", "hash_type": "sha256",
                               "hash_val": file_digest(root / "models" / "model.pt")}])
    return root


def test_archive_has_the_zoo_layout_without_weights_caches_or_working_files(small_bundle, tmp_path):
    result = build_package(small_bundle, tmp_path / "dist")
    assert result.path.name == "tiny_bundle_v0.2.0.zip"
    assert result.sha256 == _sha256(result.path)
    with zipfile.ZipFile(result.path) as archive:
        names = set(archive.namelist())
    files = {name for name in names if not name.endswith("/")}
    assert files == {
        "tiny_bundle/LICENSE",
        "tiny_bundle/large_files.yml",
        "tiny_bundle/configs/metadata.json",
        "tiny_bundle/configs/inference.json",
        "tiny_bundle/docs/README.md",
        "tiny_bundle/scripts/__init__.py",
    }
    assert "tiny_bundle/models/" in names  # the empty folder the large files are fetched into
    assert result.skipped_weights == ("models/model.pt",)
    # reproducible: same content, same digest
    again = build_package(small_bundle, tmp_path / "dist2")
    assert again.sha256 == result.sha256


def test_version_without_changelog_entry_is_refused_and_nothing_is_written(small_bundle, tmp_path):
    metadata_path = small_bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["version"] = "0.3.0"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(PackagingError, match=r"version 0\.3\.0 has no entry in its changelog \(0\.2\.0, 0\.1\.0\)"):
        build_package(small_bundle, tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_an_unlisted_large_file_is_refused_with_its_name(small_bundle, tmp_path):
    (small_bundle / "docs" / "figure.png").write_bytes(os.urandom(2 * 2**20))
    with pytest.raises(PackagingError, match=r"docs/figure\.png \(2\.0 MiB\)"):
        build_package(small_bundle, tmp_path / "dist", max_file_mb=1)


def test_large_file_list_checks(small_bundle):
    weight = small_bundle / "models" / "model.pt"
    good = read_large_files(small_bundle)
    assert check_large_files(small_bundle) == []

    weight.write_bytes(b"modified")
    with pytest.raises(LargeFilesError, match=r"model\.pt does not match its sha256"):
        check_large_files(small_bundle)
    assert record_digests(small_bundle) == ["models/model.pt"]
    assert read_large_files(small_bundle)[0].hash_val == file_digest(weight) != good[0].hash_val
    check_large_files(small_bundle)

    _write_large_files(small_bundle, [{"path": "models/w.pt", "url": "file:///w.pt", "hash_type": "sha256",
                                       "hash_val": ""}])
    with pytest.raises(LargeFilesError, match="no hash_val for models/w.pt"):
        check_large_files(small_bundle)
    assert [entry.path for entry in check_large_files(small_bundle, allow_unhashed=True)] == ["models/w.pt"]

    for bad, message in (
        ({"path": "../outside.pt", "url": "file:///w.pt"}, "must be a relative path inside the bundle"),
        ({"path": "models/w.pt", "url": "ftp://host/w.pt"}, "must be an http, https, file URL"),
        ({"path": "models/w.pt", "url": "file:///w.pt", "hash_type": "crc32"}, "hash_type 'crc32'"),
        ({"path": "models/w.pt", "url": "file:///w.pt", "hash_type": "sha256", "hash_val": "abc"}, "64 hex digits"),
    ):
        _write_large_files(small_bundle, [bad])
        with pytest.raises(LargeFilesError, match=message):
            check_large_files(small_bundle, allow_unhashed=True)


def test_repository_large_file_list_is_well_formed_and_names_the_release_weights():
    entries = {entry.path: entry for entry in read_large_files(REPO_ROOT)}
    assert set(entries) >= {"models/sam_vit_b_01ec64.pth", "models/lvmmed_resnet.torch", "models/lvmmed_vit.pth"}
    assert all(entry.hash_type == "sha256" for entry in entries.values())
    assert len(entries["models/sam_vit_b_01ec64.pth"].hash_val) == 64
    # the official README's links of 2025-03-18 (Google Drive file ids)
    assert "1p31IGo97g3ng9bOaq3eL8JaljfoCcBx0" in entries["models/lvmmed_resnet.torch"].url
    assert "1DOM3uyK8SGE5XRF1L6K6K_BWPfpPePRD" in entries["models/lvmmed_vit.pth"].url
    check_large_files(REPO_ROOT, allow_unhashed=True)


def test_package_refuses_a_listed_file_present_with_another_digest(small_bundle, tmp_path):
    (small_bundle / "models" / "model.pt").write_bytes(b"not the listed weights")
    with pytest.raises(PackagingError, match=r"model\.pt does not match its sha256 in large_files\.yml"):
        build_package(small_bundle, tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_package_needs_the_served_weights_and_names_the_command(small_bundle, tmp_path):
    _write_large_files(small_bundle, [])
    (small_bundle / "models" / "model.pt").unlink()
    with pytest.raises(PackagingError, match=r"models/model\.pt is missing.*`make model`"):
        build_package(small_bundle, tmp_path / "dist")
    torch.save({"w": torch.ones(2)}, small_bundle / "models" / "model.pt")
    result = build_package(small_bundle, tmp_path / "dist")
    assert "models/model.pt" in result.files and result.skipped_weights == ()
    with zipfile.ZipFile(result.path) as archive:
        member = archive.getinfo("tiny_bundle/models/model.pt")
        assert member.compress_type == zipfile.ZIP_STORED
        assert archive.read(member) == (small_bundle / "models" / "model.pt").read_bytes()


def test_unhashed_entries_are_packed_with_a_warning_unless_hashes_are_required(small_bundle, tmp_path, capsys):
    torch.save({"w": torch.ones(2)}, small_bundle / "models" / "model.pt")
    _write_large_files(small_bundle, [{"path": "models/encoder.pt", "url": "https://example.org/encoder.pt",
                                       "hash_type": "sha256", "hash_val": ""}])
    assert build_package(small_bundle, tmp_path / "dist").unhashed == ("models/encoder.pt",)
    with pytest.raises(PackagingError, match="no hash_val for models/encoder.pt"):
        build_package(small_bundle, tmp_path / "strict", require_hashes=True)
    assert main(["--bundle-root", str(small_bundle), "--output-dir", str(tmp_path / "cli")]) == 0
    assert "warning: large_files.yml has no sha256 for models/encoder.pt" in capsys.readouterr().err
    assert main(["--bundle-root", str(small_bundle), "--output-dir", str(tmp_path / "cli"), "--require-hashes"]) == 1


@pytest.fixture(scope="module")
def repository_package(tmp_path_factory) -> tuple[Path, str]:
    """This bundle, as a fresh clone plus ``models/model.pt``, packaged by the documented command
    ``python -m bundle.package --output-dir dist`` (the LVM-Med release digests are not recorded: warnings)."""
    source = staged_bundle(tmp_path_factory.mktemp("clone"))
    done = subprocess.run([sys.executable, "-m", "bundle.package", "--bundle-root", str(source), "--output-dir",
                           str(source / "dist")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.split(":")[0])
    assert path == source / "dist" / f"{bundle_name(REPO_ROOT)}_v{bundle_version(REPO_ROOT)}.zip"
    return path, re.search(r"sha256 ([0-9a-f]{64})", done.stdout).group(1)


def test_repository_archive_is_named_after_metadata_and_holds_the_bundle(repository_package):
    archive, _ = repository_package
    assert archive.name == f"lvm_med_v{bundle_version(REPO_ROOT)}.zip"
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
    assert {"lvm_med/configs/metadata.json", "lvm_med/large_files.yml", "lvm_med/scripts/convert_weights.py"} <= set(
        names
    )
    assert "lvm_med/models/model.pt" in names  # the served weights travel in the archive, as in the zoo's releases
    weights = [n for n in names if n.endswith((".pt", ".pth", ".torch"))]
    assert weights == ["lvm_med/models/model.pt"]
    assert not [n for n in names if "/tests/" in n or "/.venv" in n or "__pycache__" in n]
    check_archive_members(archive, "lvm_med")


def test_command_line_prints_the_sha256(small_bundle, tmp_path, capsys):
    assert main(["--bundle-root", str(small_bundle), "--output-dir", str(tmp_path / "dist")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {_sha256(tmp_path / 'dist' / 'tiny_bundle_v0.2.0.zip')}" in out


@pytest.fixture(scope="module")
def installed_bundle(repository_package, tmp_path_factory) -> Path:
    """The archive installed by ``python -m monai.bundle download --url file://...`` as users run it."""
    archive, _ = repository_package
    bundle_dir = tmp_path_factory.mktemp("bundles")
    command = [sys.executable, "-m", "monai.bundle", "download", "--name", "lvm_med", "--url", archive.as_uri(),
               "--bundle_dir", str(bundle_dir), "--progress", "False"]
    done = subprocess.run(command, cwd=bundle_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return bundle_dir / "lvm_med"


def test_monai_bundle_download_installs_the_archive_from_a_file_url(installed_bundle):
    for relative in ("configs/metadata.json", "large_files.yml", "scripts/convert_weights.py"):
        assert (installed_bundle / relative).read_bytes() == (REPO_ROOT / relative).read_bytes()
    assert (installed_bundle / "models" / "model.pt").is_file()


# What ci/verify_bundle.py of the model zoo runs on a bundle, here on the installed archive, in a fresh interpreter
# whose working folder is the installed bundle (so `scripts` is the installed copy): the metadata against the
# meta schema (offline: the copy in ../shared), the network's input and output against metadata.json, the export
# to TorchScript with the served weights, and the exported module's output against the eager network's.
_ZOO_CHECKS = """
import sys, torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
verify_metadata(meta_file="configs/metadata.json", filepath=sys.argv[1])
verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                  bundle_root=".")
ckpt_export(net_id="network_def", filepath="models/verify_model.ts", ckpt_file="models/model.pt",
            meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=".")
exported = torch.jit.load("models/verify_model.ts").eval()
parser = ConfigParser()
parser.read_config("configs/inference.json")
network = parser.get_parsed_content("network_def").eval()
network.load_state_dict(torch.load("models/model.pt", weights_only=True))
image = torch.randn(1, 1, 64, 96)
with torch.no_grad():
    torch.testing.assert_close(exported(image), network(image))
print("zoo checks passed")
"""


@pytest.mark.skipif(not META_SCHEMA.is_file(), reason=f"the meta schema copy {META_SCHEMA} is not beside the clone")
def test_installed_archive_passes_the_model_zoo_checks(installed_bundle, tmp_path):
    # necessary and preferred files (verify_bundle_directory)
    for relative in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (installed_bundle / relative).is_file(), relative
    # version and changelog (verify_version_changes)
    metadata = json.loads((installed_bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    assert bundle_version(installed_bundle) == metadata["version"]
    assert metadata["eval_metrics"], "metadata.json must state the served weights' measured score"

    # large files (verify_bundle_directory downloads them first): this machine is offline, so each listed path is
    # served from a file:// stand-in, with its sha256, through MONAI's download_large_files
    stand_ins = tmp_path / "release"
    stand_ins.mkdir()
    entries = []
    for entry in read_large_files(installed_bundle):
        served = stand_ins / Path(entry.path).name
        served.write_bytes(os.urandom(4096))
        entries.append({"path": entry.path, "url": served.as_uri(), "hash_type": "sha256", "hash_val": _sha256(served)})
    checked = tmp_path / "checked"
    checked.mkdir()
    _write_large_files(checked, entries)
    download_large_files(bundle_path=str(checked))
    for entry in entries:
        assert _sha256(checked / entry["path"]) == entry["hash_val"]
    _write_large_files(checked, [{**entries[0], "path": "models/other.bin", "hash_val": "0" * 64}])
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(checked))

    done = subprocess.run([sys.executable, "-c", _ZOO_CHECKS, str(META_SCHEMA)], cwd=installed_bundle,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "zoo checks passed" in done.stdout
    (installed_bundle / "models" / "verify_model.ts").unlink()


def test_documented_archive_names_follow_the_metadata_version():
    expected = f"{bundle_name(REPO_ROOT)}_v{bundle_version(REPO_ROOT)}.zip"
    documents = [REPO_ROOT / "README.md", REPO_ROOT / "bundle" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
                 *sorted((REPO_ROOT / "bundle").rglob("*.py"))]
    for document in documents:
        for mention in re.findall(r"lvm_med_v[0-9][0-9A-Za-z.]*\.zip", document.read_text()):
            assert mention == expected, f"{document} names {mention}; metadata.json makes {expected}"


@pytest.mark.slow
def test_installed_copy_runs_its_inference_config_from_its_own_folder(installed_bundle, tmp_path):
    import nibabel as nib
    from monai.bundle import ConfigParser
    from PIL import Image

    parser = ConfigParser()
    parser.read_config(str(installed_bundle / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), installed_bundle / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    volume = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    (inputs / volume.name).write_bytes(volume.read_bytes())
    grid = np.indices((64, 80)).sum(axis=0)
    Image.fromarray((grid % 32 * 8).astype(np.uint8)).save(inputs / "ramp.png")

    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(inputs)],
        cwd=installed_bundle, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = installed_bundle / "runs" / "inference"  # bundle_root "." is the installed folder
    labels = set(range(int(parser.get_parsed_content("num_classes"))))  # an expression: it reads the model's settings
    volume_mask = np.asarray(nib.load(outputs / "anatomical_seg.nii.gz").dataobj)
    assert volume_mask.shape == nib.load(volume).shape
    png_mask = np.asarray(Image.open(outputs / "ramp_seg.png"))
    assert png_mask.shape == (64, 80)
    assert set(np.unique(volume_mask).tolist()) <= labels and set(np.unique(png_mask).tolist()) <= labels


def test_download_large_files_fetches_and_hash_checks_a_weight_file(tmp_path):
    server_side = tmp_path / "release" / "encoder_r50.pt"
    server_side.parent.mkdir()
    torch.save({"conv1.weight": torch.randn(4, 3, 7, 7)}, server_side)
    bundle = tmp_path / "lvm_med"
    bundle.mkdir()
    entry = {"path": "models/encoder_r50.pt", "url": server_side.as_uri(), "hash_type": "sha256"}
    _write_large_files(bundle, [{**entry, "hash_val": "0" * 64}])
    with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
        download_large_files(bundle_path=str(bundle))
    assert not (bundle / "models" / "encoder_r50.pt").exists()

    _write_large_files(bundle, [{**entry, "hash_val": _sha256(server_side)}])
    download_large_files(bundle_path=str(bundle))
    assert _sha256(bundle / "models" / "encoder_r50.pt") == _sha256(server_side)


def test_checked_install_verifies_the_digest(small_bundle, tmp_path):
    result = build_package(small_bundle, tmp_path / "dist")
    with pytest.raises(HashCheckError):
        install_bundle(result.path.as_uri(), "tiny_bundle", tmp_path / "bad", "f" * 64)
    assert not (tmp_path / "bad" / "tiny_bundle").exists()
    installed = install_bundle(result.path.as_uri(), "tiny_bundle", tmp_path / "good", result.sha256)
    assert (installed / "configs" / "metadata.json").read_bytes() == (small_bundle / "configs/metadata.json").read_bytes()


@pytest.fixture
def traversal_zip(tmp_path: Path) -> Path:
    """A bundle-looking zip with a member that climbs out of the extraction folder."""
    path = tmp_path / "served" / "evil.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/configs/metadata.json", "{}")
        archive.writestr("evil/../../escaped.txt", "owned")
    return path


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_archives_with_parent_entries_are_refused_before_anything_escapes(traversal_zip, tmp_path):
    target = tmp_path / "install" / "deeper"
    escaped = [tmp_path / "escaped.txt", tmp_path / "install" / "escaped.txt"]

    with pytest.raises(UnsafeArchiveError, match=r"'evil/\.\./\.\./escaped\.txt' would be written outside"):
        install_bundle(traversal_zip.as_uri(), "evil", target, _sha256(traversal_zip))
    assert not (target / "evil").exists()
    # MONAI's own extraction (used by `python -m monai.bundle download`) refuses it too
    with pytest.raises(ValueError, match="Unsafe path"):
        extractall(traversal_zip, tmp_path / "monai_extract" / "deeper", has_base=True)
    with pytest.raises(ValueError, match="Unsafe path"):
        download(name="evil", url=traversal_zip.as_uri(), bundle_dir=str(tmp_path / "monai_download" / "deeper"),
                 progress=False)
    assert not any(path.exists() for path in escaped)
    assert not (tmp_path / "monai_extract" / "escaped.txt").exists()
    assert not (tmp_path / "monai_download" / "escaped.txt").exists()


def test_links_and_foreign_top_folders_are_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        link = zipfile.ZipInfo("lvm_med/models/model.pt")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        check_archive_members(path, "lvm_med")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other/configs/metadata.json", "{}")
    with pytest.raises(UnsafeArchiveError, match="not inside the top folder lvm_med/"):
        check_archive_members(path, "lvm_med")
