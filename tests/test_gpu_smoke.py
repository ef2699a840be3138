"""make gpu-smoke (bench/cli/gpu_smoke.py) without training: arguments, the stages'
command lines, the table read from a fabricated record file, and the exit status.
The stages themselves run only in the script (CPU dry run: --device cpu)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import COMMANDS, gpu_smoke
from bench.tracking.schema import VERSION

GIB = 2**30


def record(valuer="logra", seed=0, status="ok", error=None, device="cuda", peak=int(1.5 * GIB), experiment="smoke"):
    return {"schema": VERSION, "experiment": experiment, "valuer": valuer, "seed": seed, "status": status,
            "error": error, "cost": {"device": device, "gpus": 1 if device == "cuda" else 0, "gpu_hours": 0.0125,
                                     "peak_gpu_mem_bytes": peak, "wall_s": 45.0}}


def write_records(results: Path, records: list[dict], experiment="smoke") -> None:
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f"{experiment}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_registered_and_arguments():
    assert COMMANDS["gpu-smoke"][0] == "bench.cli.gpu_smoke"
    args = gpu_smoke.parser().parse_args([])
    assert (args.device, args.stages, args.keep) == ("auto", "a,b,c", False)
    assert gpu_smoke.parse_stages(" c, a,c ") == ["c", "a"]
    with pytest.raises(SystemExit) as e:
        gpu_smoke.parse_stages("a,d")
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gpu_smoke.parser().parse_args(["--device", "tpu"])


def test_stage_commands(tmp_path):
    a = gpu_smoke.stage_command("a", "cuda", tmp_path)
    assert "experiment=smoke" in a and "n_jobs=2" in a and "game.device=cuda" in a
    chosen = next(x for x in a if x.startswith("valuer=["))[len("valuer=["):-1].split(",")
    assert set(gpu_smoke.FAMILIES) <= set(chosen)
    assert f"results_dir={tmp_path / 'a'}" in a and f"cache_dir={tmp_path / 'cache'}" in a
    assert gpu_smoke.stage_command("b", "cpu", tmp_path)[3] == "pack-bench"
    on_gpu, on_cpu = (gpu_smoke.stage_command("c", d, tmp_path) for d in ("cuda", "cpu"))
    assert on_gpu[3:5] == ["hardware", "bench"] and "--preset" not in on_gpu     # make bench chooses
    assert on_cpu[5:7] == ["--preset", "default_gpu"]


def test_stage_table_from_a_record_file(tmp_path, capsys):
    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: Expected all tensors to be on the same device"
    write_records(tmp_path / "a", [record(), record(valuer="ekfac", status="failed", error=trace)])
    log = tmp_path / "a.log"
    log.write_text("[dvbench] smoke: ...\n")
    ok = gpu_smoke.report_stage(gpu_smoke.STAGES["a"], 1, 12.0, 180, tmp_path, log, "cuda")
    out = capsys.readouterr().out
    assert not ok
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("smoke ")}
    assert rows["logra"].split()[2:8] == ["0", "ok", "cuda", "1", "0.0125", "1.50"]
    assert rows["ekfac"].split()[3] == "failed"
    assert rows["ekfac"].endswith("RuntimeError: Expected all tensors to be on the same device")
    assert "stage GPU-hours 0.0250" in out
    assert "FAILED: exit status 1; 1 record(s) not ok: ekfac/0" in out


def test_a_stage_passes_only_with_records_all_ok(tmp_path, capsys):
    log = tmp_path / "log"
    log.write_text("")
    stage = gpu_smoke.STAGES["a"]
    assert not gpu_smoke.report_stage(stage, 0, 1.0, 180, tmp_path, log, "cpu")     # no records
    write_records(tmp_path / "a", [record(device="cpu", peak=None)])
    assert gpu_smoke.report_stage(stage, 0, 1.0, 180, tmp_path, log, "cpu")
    assert not gpu_smoke.report_stage(stage, None, 1.0, 180, tmp_path, log, "cpu")  # timed out
    assert "timed out after" in capsys.readouterr().out


def test_stage_c_on_a_gpu_must_choose_default_gpu(tmp_path):
    log = tmp_path / "log"
    log.write_text("")
    write_records(tmp_path / "c", [record(experiment="default")], experiment="default")
    assert not gpu_smoke.report_stage(gpu_smoke.STAGES["c"], 0, 1.0, 240, tmp_path, log, "cuda")
    assert gpu_smoke.report_stage(gpu_smoke.STAGES["c"], 0, 1.0, 240, tmp_path, log, "cpu")


def test_pack_bench_stage_shows_its_table(tmp_path, capsys):
    log = tmp_path / "b.log"
    log.write_text("noise\n[dvbench] pack-bench: smoke, ...\nspeed-up (one by one / packed)  3.10x\n")
    assert gpu_smoke.report_stage(gpu_smoke.STAGES["b"], 0, 1.0, 60, tmp_path, log, "cpu")
    out = capsys.readouterr().out
    assert "speed-up (one by one / packed)  3.10x" in out and "noise" not in out


@pytest.mark.parametrize("failing, code", [(None, 0), ("c", 1)])
def test_exit_status_is_1_when_a_stage_fails(monkeypatch, capsys, failing, code):
    """main() with the children faked: each writes one record, stage ``failing``'s not ok."""
    def fake_child(cmd, log, timeout_s):
        results = Path(next(x for x in cmd if x.startswith("results_dir=")).split("=", 1)[1])
        key = results.name
        log.write_text(f"[dvbench] pack-bench: fake {key}\n")
        write_records(results, [record(device="cpu", peak=None, experiment="default_gpu",
                                       status="failed" if key == failing else "ok")])
        return 0
    monkeypatch.setattr(gpu_smoke, "run_child", fake_child)
    assert gpu_smoke.main(["--device", "cpu"]) == code
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"gpu-smoke: {3 - code} stage(s) ok, {code} failed" + (" (c)" if code else ";"))
