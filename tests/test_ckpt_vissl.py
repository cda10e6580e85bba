"""SEER weights in: VISSL-layout checkpoints (consolidated and sliced, with and without -part
stages) import into fsdpkit slices that load bitwise and compute what the VISSL model does."""

import argparse
import json
import shutil

import pytest
import torch
from vissl_fns import VisslSwAV, randomize, save_consolidated, save_sliced, vissl_state

from ckpt import CheckpointError, load_sliced, verify
from ckpt._cli_formats import add_format_commands
from ckpt.vissl import import_vissl, map_vissl_keys, vissl_slice_file
from kitcore.console import run_command
from seer_train.models import PRESETS, build_swav_model


def _parts(preset):
    """VISSL stage_checkpoints cutting every stage of more than one block in two."""
    return [[d // 2] if d > 1 else [d] for d in (s.depth for s in preset.regnet.stages())]


def _vissl_tiny(parts):
    preset = PRESETS["tiny"]
    return randomize(VisslSwAV(preset, _parts(preset) if parts else None)).eval()


@pytest.mark.parametrize("parts", [False, True], ids=["plain", "parts"])
@pytest.mark.parametrize("layout", ["consolidated", "sliced"])
def test_import_loads_bitwise_and_computes_what_vissl_computes(tmp_path, layout, parts):
    vissl = _vissl_tiny(parts)
    trunk, heads = vissl_state(vissl)
    assert any("-part" in k for k in trunk) == parts
    save = save_consolidated if layout == "consolidated" else save_sliced
    src = save(tmp_path / "model_final_checkpoint_phase1.torch", trunk, heads)
    info = import_vissl(src, tmp_path / "sliced", model="tiny")
    assert info["vissl_type"] == ("consolidated" if layout == "consolidated" else "slice_list")
    assert info["tensors"] == len(trunk) + len(heads)
    verify(tmp_path / "sliced")
    ours = build_swav_model(PRESETS["tiny"], "cpu").eval()
    load_sliced(tmp_path / "sliced", ours)
    # every VISSL tensor landed somewhere, bitwise (as a multiset: no mapping needed)
    theirs = sorted(t.flatten().tolist() for t in [*trunk.values(), *heads.values()])
    assert theirs == sorted(t.flatten().tolist() for t in ours.state_dict().values())
    # and in the right place: the same forward, bitwise (same ops in the same order)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, scores = vissl(x)
        assert torch.equal(ours(x, features_only=True), features)
        assert torch.equal(ours(x)[1], scores)


def test_sliced_folder_moved_still_loads(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=True))
    save_sliced(tmp_path / "a" / "ckpt.torch", trunk, heads)
    shutil.move(tmp_path / "a", tmp_path / "b")  # the slice list's absolute paths now dangle
    import_vissl(tmp_path / "b" / "ckpt.torch", tmp_path / "sliced", model="tiny")
    ours = build_swav_model(PRESETS["tiny"], "cpu")
    load_sliced(tmp_path / "sliced", ours)
    assert torch.equal(
        ours.trunk.units[1].c_bn.running_var,
        trunk["_feature_blocks.res2.block1-part0.block1-0.f.final_bn.running_var"],
    )


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("parts", [False, True], ids=["plain", "parts"])
def test_every_preset_maps_on_meta(name, parts):
    """No allocation: both models on meta, shapes checked key by key (regnet10b included)."""
    preset = PRESETS[name]
    with torch.device("meta"):
        vissl = VisslSwAV(preset, _parts(preset) if parts else None)
    trunk, heads = vissl_state(vissl)
    ours = build_swav_model(preset, "meta")
    plan = map_vissl_keys(ours, trunk, heads)
    n = len(ours.state_dict())
    assert len(plan) == n == len(trunk) + len(heads)
    assert len({v for v in plan.values()}) == n  # one VISSL key per tensor of ours
    if parts and name == "regnet10b":
        assert plan["param/trunk.units.10.b.weight"][1].count("-part") == 1


def test_wrong_model_is_one_line_naming_the_key(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=False))
    src = save_consolidated(tmp_path / "c.torch", trunk, heads)
    with pytest.raises(
        CheckpointError, match=r"VISSL trunk key _feature_blocks\.\S+: shape \["
    ) as e:
        import_vissl(src, tmp_path / "out", model="rg8gf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_missing_and_unexpected_keys_name_the_key(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=False))
    missing = dict(trunk)
    del missing["_feature_blocks.res3.block2-0.f.se.excitation.2.bias"]
    with pytest.raises(
        CheckpointError, match=r"no key .*res3\.block2-0\.f\.se\.excitation\.2\.bias"
    ):
        import_vissl(save_consolidated(tmp_path / "m.torch", missing, heads), tmp_path / "o",
                     model="tiny")  # fmt: skip
    extra = dict(heads) | {"0.projection_head.1.running_mean": torch.zeros(128)}  # a head BN
    with pytest.raises(CheckpointError, match=r"heads key 0\.projection_head\.1\.running_mean"):
        import_vissl(save_consolidated(tmp_path / "x.torch", trunk, extra), tmp_path / "o",
                     model="tiny")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_missing_or_bad_slice_names_the_key_and_writes_nothing(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=False))
    src = save_sliced(tmp_path / "s.torch", trunk, heads)
    key = "_feature_blocks.res4.block3-0.f.c.weight"
    vissl_slice_file(src, key).unlink()
    with pytest.raises(CheckpointError, match=rf"missing \(the slice of VISSL trunk key {key}\)"):
        import_vissl(src, tmp_path / "o", model="tiny")
    torch.save({"type": "slice", "weight": torch.zeros(3)}, vissl_slice_file(src, key))
    with pytest.raises(CheckpointError, match=rf"{key}: shape \[3\]"):
        import_vissl(src, tmp_path / "o", model="tiny")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return 0


def test_pickled_code_is_refused_not_run(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=False))
    src = tmp_path / "evil.torch"
    torch.save({"type": "consolidated", "hook": _Payload(),
                "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}},
               src)  # fmt: skip
    with pytest.raises(CheckpointError, match="nothing was executed"):
        import_vissl(src, tmp_path / "o", model="tiny")
    assert not _Payload.ran


def test_truncated_file_unknown_model_and_existing_dst(tmp_path):
    trunk, heads = vissl_state(_vissl_tiny(parts=False))
    src = save_consolidated(tmp_path / "c.torch", trunk, heads)
    cut = tmp_path / "cut.torch"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.torch: not a readable torch file"):
        import_vissl(cut, tmp_path / "o", model="tiny")
    with pytest.raises(CheckpointError, match="unknown model 'rg9gf'"):
        import_vissl(src, tmp_path / "o", model="rg9gf")
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        import_vissl(src, tmp_path / "o", model="tiny")


def test_cli_import_vissl_json_table_and_error(tmp_path, capsys):
    trunk, heads = vissl_state(_vissl_tiny(parts=True))
    src = save_consolidated(tmp_path / "c.torch", trunk, heads)
    parser = argparse.ArgumentParser(prog="ckpt")
    add_format_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["import-vissl", str(src), str(tmp_path / "a"), "--model", "tiny"]
    assert run_command("ckpt", parser, [*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["units"] == 8 and info["tensors"] == len(trunk) + len(heads)
    argv[2] = str(tmp_path / "b")
    assert run_command("ckpt", parser, argv) == 0
    assert "consolidated" in capsys.readouterr().out
    assert run_command("ckpt", parser, argv) == 2  # b exists now
    err = capsys.readouterr().err
    assert err.startswith("ckpt: error: ") and "exists" in err and err.count("\n") == 1
