"""build.toml is what kernel-builder builds from: it copies only the files build.toml lists. Every quoted #include of a
listed file must resolve to a listed file, every source under flash_sdpa/ and torch-ext/ must be listed (or excluded
on purpose), and the emulated build, made from a stage of those files alone, carries what kernels >= 0.19 reads
(a digest in metadata.json, symbols.json for `kernels describe-api`)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts import build_manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kernels_ci


@pytest.fixture(scope="module")
def manifest():
    return build_manifest.read(ROOT)


def test_every_quoted_include_of_a_listed_file_is_listed(manifest):
    problems = build_manifest.unresolved_includes(manifest)
    assert not problems, "build.toml misses files its sources include:\n" + "\n".join(problems)


def test_every_source_is_listed_or_excluded(manifest):
    unlisted = build_manifest.unlisted_sources(manifest)
    assert not unlisted, ("sources build.toml does not list (kernel-builder would not copy them): list them in "
                          "build.toml or name them in build_manifest.EXCLUDED with the reason:\n" + "\n".join(unlisted))


def test_the_check_catches_an_unlisted_header():
    # build.toml before issue 18 did not list params_types.h, which three listed headers include (and the glue embeds).
    text = (ROOT / "build.toml").read_text()
    old = re.sub(r'^\s*"flash_sdpa/params_types.h",.*\n', "", text, flags=re.M)
    assert old != text
    m = build_manifest.read(ROOT, old)
    problems = build_manifest.unresolved_includes(m)
    assert {p.split(":")[0] for p in problems} == {"flash_sdpa/attention_options.h", "flash_sdpa/varlen_params.h",
                                                   "flash_sdpa/paged_params.h", "flash_sdpa/metal_launch.mm"}, problems
    assert [p for p in problems if p.startswith("flash_sdpa/metal_launch.mm")] == [
        'flash_sdpa/metal_launch.mm: #embed "params_types.h" is not a file build.toml lists (exists as '
        "flash_sdpa/params_types.h: add it to build.toml)"]
    assert all('"params_types.h"' in p and "add it to build.toml" in p for p in problems)
    assert build_manifest.unlisted_sources(m) == ["flash_sdpa/params_types.h"]


def test_builder_provided_includes_are_allowed_and_nothing_else(tmp_path):
    (tmp_path / "torch-ext" / "pkg_x").mkdir(parents=True)
    (tmp_path / "torch-ext" / "a.cpp").write_text('#include "registration.h"\n#include "b.h"\n#include <vector>\n')
    (tmp_path / "torch-ext" / "m.mm").write_text("#include EMBEDDED_METALLIB_HEADER\n#include OTHER_MACRO\n")
    toml = '[general]\nname = "pkg-x"\n[torch]\nsrc = ["torch-ext/a.cpp", "torch-ext/m.mm"]\n'
    m = build_manifest.read(tmp_path, toml)
    problems = build_manifest.unresolved_includes(m)
    assert len(problems) == 2, problems
    assert '"b.h"' in problems[0] and "OTHER_MACRO" in problems[1]


def test_stage_holds_only_the_listed_files_and_the_package(manifest, tmp_path):
    stage = build_manifest.stage(manifest, tmp_path / "stage")
    got = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "torch-ext" / manifest.package).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert got == set(manifest.listed) | package
    assert not (stage / "msl").exists() and not (stage / "tests").exists()


def _kernels_at_least(version):
    from importlib import metadata

    try:
        have = tuple(int(x) for x in metadata.version("kernels").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return have >= version


def test_build_toml_is_kernel_builders_current_schema(capfd):
    if not _kernels_at_least((0, 19)):
        pytest.skip("kernels < 0.19 parses build.toml only up to edition 5 (edition 6 is kernel-builder 0.19's)")
    rust = pytest.importorskip("kernels._rust", reason="kernels parses build.toml with its Rust core")
    build = rust.Build.open(str(ROOT))
    assert [str(b).lower() for b in build.general.backends] == ["metal"]
    # An older edition is upgraded in memory with a warning ("the Nix builder requires edition 6").
    assert "upgrading to edition" not in capfd.readouterr().err


# --- The emulated build: what kernels 0.19 requires of a variant. -------------------------------------------------


@pytest.fixture(scope="module")
def variant(kernel):
    path = Path(kernel.__file__).parent
    if not (path / "metal_cpu_kernels").is_dir():
        pytest.skip("not the emulated build (kernel-builder's Metal build writes its own metadata)")
    return path


def test_metadata_records_the_digest_kernels_checks(variant):
    metadata = json.loads((variant / "metadata.json").read_text())
    digest = metadata.get("digest")
    assert digest and digest["algorithm"] == "sha256"
    assert "symbols.json" in digest["files"] and "__init__.py" in digest["files"]
    assert digest == build_manifest.variant_digest(variant)
    if not _kernels_at_least((0, 19)):
        pytest.skip("kernels' own digest check is checked against 0.19's API")
    rust = pytest.importorskip("kernels._rust")
    kdigest = pytest.importorskip("kernels._internals.digest")
    result = kdigest.verify_digest(variant, metadata=rust.Metadata.read_from_file(variant / "metadata.json"),
                                   location=None, cache=False)
    assert isinstance(result, kdigest.DigestVerificationResult.Success), str(result)


def test_symbols_json_lists_the_public_api(kernel, variant):
    symbols = json.loads((variant / "symbols.json").read_text())
    assert symbols["schema_version"] == 1 and symbols["layers"] == []
    assert [f["name"] for f in symbols["functions"]] == sorted(kernel.__all__)


def test_kernels_describe_api_works_on_the_build(kernel, variant):
    exe = shutil.which("kernels")
    if exe is None:
        pytest.skip("the kernels CLI is not on PATH")
    if "describe-api" not in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this kernels has no describe-api (kernels < 0.19)")
    r = subprocess.run([exe, "describe-api", str(variant), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [f["name"] for f in json.loads(r.stdout)["functions"]] == sorted(kernel.__all__)


def test_a_build_older_than_the_sources_is_reported(variant, tmp_path):
    fake = tmp_path / "variant"
    (fake / "metal_cpu_kernels").mkdir(parents=True)
    assert "predates source digests" in build_manifest.stale_build(fake, ROOT)
    recorded = json.loads((variant / "emulated_build.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", recorded["source-digest"])
    (fake / "emulated_build.json").write_text(json.dumps({"source-digest": build_manifest.source_digest(ROOT)}))
    assert build_manifest.stale_build(fake, ROOT) is None
    # One byte of one listed header changed after the build.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("build", ".cache", ".git", "__pycache__"))
    assert build_manifest.stale_build(fake, tree) is None
    header = tree / "flash_sdpa" / "params_types.h"
    header.write_text(header.read_text() + "\n")
    assert "rebuild" in build_manifest.stale_build(fake, tree)
    # Kernel-builder's Metal build (no emulator kernels): nothing to compare.
    assert build_manifest.stale_build(tmp_path, ROOT) is None
