"""images.make_all: the registry, its reporting, and the gallery command end to end."""

import json
import sys
import types

import pytest
from PIL import Image

from images import make_all
from images.make_all import GalleryEntry


def _fake_family(monkeypatch):
    mod = types.ModuleType("fake_gallery_family")

    def good(out_dir, work_dir, quick):
        assert quick and work_dir.is_dir()
        Image.new("RGB", (8, 8), "red").save(out_dir / "good.png")
        return "drew a red square"

    def lazy(out_dir, work_dir, quick):
        return None  # writes nothing: must be reported as failed

    def broken(out_dir, work_dir, quick):
        raise RuntimeError("family code broke\nsecond line")

    mod.good, mod.lazy, mod.broken = good, lazy, broken
    monkeypatch.setitem(sys.modules, "fake_gallery_family", mod)
    registry = (
        GalleryEntry("good", "fake_gallery_family:good", ("good.png",), "a red square", "cmd good"),
        GalleryEntry("lazy", "fake_gallery_family:lazy", ("lazy.png",), "never written", "cmd lazy"),
        GalleryEntry("broken", "fake_gallery_family:broken", ("broken.png",), "raises", "cmd broken"),
        GalleryEntry("later", "no_such_family_yet.gallery:plot", ("later.png",), "not there", "cmd later"),
        GalleryEntry("no_func", "fake_gallery_family:missing", ("x.png",), "no function", "cmd x"),
    )
    monkeypatch.setattr(make_all, "REGISTRY", registry)


def test_registry_reports_made_failed_and_not_yet_available(tmp_path, monkeypatch, capsys):
    _fake_family(monkeypatch)
    rc = make_all.main(["--quick", "--out_dir", str(tmp_path)])
    assert rc == 1  # two entries failed
    manifest = json.loads((tmp_path / "gallery.json").read_text())["entries"]
    assert list(manifest) == ["good", "lazy", "broken", "later", "no_func"]
    assert manifest["good"]["status"] == "made" and manifest["good"]["note"] == "drew a red square"
    assert (tmp_path / "good.png").is_file()
    assert manifest["lazy"]["status"] == "failed" and "lazy.png" in manifest["lazy"]["reason"]
    assert manifest["broken"]["status"] == "failed" and manifest["broken"]["reason"] == "RuntimeError: family code broke"
    assert manifest["later"] == {**manifest["later"], "status": "not yet available",
                                 "reason": "module no_such_family_yet.gallery does not exist yet"}
    assert "has no function missing" in manifest["no_func"]["reason"]
    out = capsys.readouterr().out
    assert "not yet available" in out and "failed" in out  # listed, not skipped silently


def test_only_and_bad_arguments(tmp_path, monkeypatch, capsys):
    _fake_family(monkeypatch)
    assert make_all.main(["--quick", "--out_dir", str(tmp_path), "--only", "good"]) == 0
    assert list(json.loads((tmp_path / "gallery.json").read_text())["entries"]) == ["good"]
    assert make_all.main(["--out_dir", str(tmp_path), "--only", "nope"]) == 2
    assert make_all.main(["--out_dir", str(tmp_path), "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "unknown entries ['nope']" in err and "--threads" in err
    assert make_all.main(["--list"]) == 0
    assert "not yet available" in capsys.readouterr().out


def test_real_registry_names_each_family():
    makers = {e.name: e.maker for e in make_all.REGISTRY}
    assert {"dynamics", "vision_attention", "completions", "benchmark", "attention_sinks", "lm_curves"} <= set(makers)
    files = [f for e in make_all.REGISTRY for f in e.files]
    assert len(files) == len(set(files))


def test_dynamics_entry_writes_its_files(tmp_path):
    assert make_all.main(["--quick", "--out_dir", str(tmp_path), "--only", "dynamics"]) == 0
    entry = json.loads((tmp_path / "gallery.json").read_text())["entries"]["dynamics"]
    assert entry["status"] == "made"
    for name in entry["files"]:
        assert (tmp_path / name).stat().st_size > 1000, name
    assert Image.open(tmp_path / "dynamics_circle.gif").n_frames > 1


@pytest.mark.slow
def test_gallery_command_produces_every_file_it_lists(tmp_path):
    rc = make_all.main(["--quick", "--out_dir", str(tmp_path)])
    entries = json.loads((tmp_path / "gallery.json").read_text())["entries"]
    assert list(entries) == [e.name for e in make_all.REGISTRY]
    failed = {n: e["reason"] for n, e in entries.items() if e["status"] == "failed"}
    assert rc == 0 and not failed, failed
    made = [n for n, e in entries.items() if e["status"] == "made"]
    assert {"dynamics", "vision_attention", "completions", "benchmark"} <= set(made)
    for name in made:
        for f in entries[name]["files"]:
            with Image.open(tmp_path / f) as im:
                assert im.size[0] > 50 and im.size[1] > 50, f
    for n, e in entries.items():
        assert e["status"] in ("made", "not yet available"), n
