"""Tuner study management: shared SQLite, killed workers, seeding, budgets.

The worker processes run ``bench.tune.run_study`` (the harness's code path)
with a short sleeping objective in place of a distillation, because these
tests are about storage and trial accounting, not about a method.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from bench.cli import main

from bench.errors import ConfigError
from bench.tune import StudySettings, finished_trials, open_study, run_study

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys, time
    from bench.tune import StudySettings, run_study

    storage, name, n_trials, sleep_s, heartbeat, grace, workers = sys.argv[1:8]

    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        time.sleep(float(sleep_s))
        return -x * x

    settings = StudySettings(storage=storage, study_name=name, n_trials=int(n_trials),
                             heartbeat_s=int(heartbeat), grace_s=int(grace), workers=int(workers))
    run_study(settings, objective, {"x": 0.0})
    """
)


def _worker(tmp_path, storage, name, n_trials, sleep_s=0.1, heartbeat=1, grace=3, workers=1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, str(script), storage, name, str(n_trials), str(sleep_s), str(heartbeat), str(grace),
         str(workers)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


CLAIMER = textwrap.dedent(
    """
    import json, sys, warnings
    import optuna
    from bench.tune import StudySettings, make_storage

    warnings.simplefilter("ignore")  # Optuna warns about a heartbeat storage used outside Study.optimize.
    storage, name, out, queued = sys.argv[1:5]
    study = optuna.load_study(study_name=name, storage=make_storage(StudySettings(storage=storage, study_name=name)))
    claimed = []
    while True:
        trial = study.ask()
        if trial.number >= int(queued):  # The queue is empty, so Optuna made a fresh trial.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        claimed.append(trial.number)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(claimed, handle)
    """
)


def test_enqueued_trial_claimed_once(tmp_path):
    # SQLite ignores SELECT ... FOR UPDATE, so without the claim lock several workers pop one enqueued trial.
    # Before the lock, 2 to 14 of these 60 claims were doubled per run on a 2-core machine.
    storage = f"sqlite:///{tmp_path / 'claim.db'}"
    study = open_study(StudySettings(storage=storage, study_name="claim"))
    for i in range(60):
        study.enqueue_trial({"x": float(i)})
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER, encoding="utf-8")
    procs = [
        subprocess.Popen([sys.executable, str(script), storage, "claim", str(tmp_path / f"{k}.json"), "60"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for k in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    claims = [n for k in range(4) for n in json.loads((tmp_path / f"{k}.json").read_text(encoding="utf-8"))]
    assert sorted(claims) == list(range(60))


def _load(storage, name):
    return optuna.load_study(study_name=name, storage=storage)


def test_four_workers_share_one_sqlite_file(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [_worker(tmp_path, storage, "shared", 20, workers=4) for _ in range(4)]
    # A reader polls the same file meanwhile, as a dashboard would.
    deadline = time.time() + 240
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        try:
            _load(storage, "shared").get_trials(deepcopy=False)
        except KeyError:
            pass  # the study is not created yet
        time.sleep(0.2)
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "OperationalError" not in err
    study = _load(storage, "shared")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 20
    assert study.user_attrs["note"] == "tuning not reproducible (parallel workers)"


def test_killed_worker_trial_fails_and_study_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'kill.db'}"
    proc = _worker(tmp_path, storage, "killed", 6, sleep_s=2.0)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            trials = _load(storage, "killed").get_trials(deepcopy=False)
        except KeyError:
            trials = []
        if any(t.number == 1 and t.state == optuna.trial.TrialState.RUNNING for t in trials):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(4)  # longer than the 3 s grace period

    resumed = _worker(tmp_path, storage, "killed", 6, sleep_s=0.05)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    study = _load(storage, "killed")
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert len(states) == 7
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states


def _quadratic(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    return -(x - 0.3) ** 2


def test_seeded_single_worker_repeats_parameters(tmp_path):
    runs = []
    for db in ("a.db", "b.db"):
        settings = StudySettings(storage=f"sqlite:///{tmp_path / db}", study_name="seeded", n_trials=10, seed=0)
        study = run_study(settings, _quadratic, {"x": 0.0})
        runs.append([t.params["x"] for t in study.trials])
    assert runs[0] == runs[1]
    assert runs[0][0] == 0.0


def test_resumed_study_runs_only_missing_trials(tmp_path):
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="resume", n_trials=3)
    run_study(settings, _quadratic, {"x": 0.0})
    bigger = StudySettings(storage=settings.storage, study_name="resume", n_trials=5)
    study = run_study(bigger, _quadratic, {"x": 0.0})
    assert finished_trials(study) == 5
    assert len(study.trials) == 5


def test_default_config_enqueued_once(tmp_path):
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'd.db'}", study_name="default", n_trials=2)
    run_study(settings, _quadratic, {"x": 0.0})
    study = run_study(StudySettings(storage=settings.storage, study_name="default", n_trials=4), _quadratic,
                      {"x": 0.0})
    defaults = [t for t in study.trials if t.user_attrs.get("default")]
    assert len(defaults) == 1


def _raises_on_default(trial):
    """Score ``-x**2``, raising FloatingPointError on the default trial as a diverging config would."""
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.user_attrs.get("default"):
        raise FloatingPointError("the default config diverges")
    return -x * x


def test_failed_default_trial_is_queued_again(tmp_path):
    # A default trial whose process died ends FAIL; the resumed study must still score the default.
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'f.db'}", study_name="again", n_trials=2)
    with pytest.raises(FloatingPointError):
        # Stop after the failed default: the objective raises out of optimize only on the first call here.
        open_study(settings, {"x": 0.5}).optimize(_raises_on_default, n_trials=1)
    study = run_study(settings, _quadratic, {"x": 0.5})
    defaults = [t for t in study.trials if t.user_attrs.get("default")]
    assert [t.state.name for t in defaults] == ["FAIL", "COMPLETE"]
    assert defaults[1].params == {"x": 0.5}
    assert finished_trials(study) == 2


def test_default_params_follow_suite_values():
    from bench.tune import default_params

    assert default_params("foster", {"steps": 300})["steps"] == 300
    assert default_params("foster")["steps"] == 200
    # lr_bias is searched only when item_bias is on; the default trial follows the suite's branch.
    assert default_params("foster", {"item_bias": True, "lr_bias": 0.2})["lr_bias"] == 0.2
    assert "lr_bias" not in default_params("foster")
    with pytest.raises(ConfigError, match="'100' not in"):
        default_params("foster", {"real_batch": 100})


def test_default_trial_that_raised_is_not_queued_again(tmp_path):
    # A config that raises would raise again on every resume and block the study.
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="raises", n_trials=2)
    run_study(settings, _raises_on_default, {"x": 0.5})
    study = run_study(settings, _raises_on_default, {"x": 0.5})
    defaults = [t for t in study.trials if t.user_attrs.get("default")]
    assert [t.state.name for t in defaults] == ["FAIL"]
    assert defaults[0].user_attrs["raised"] == "FloatingPointError"
    assert finished_trials(study) == 2


def test_pruned_trials_count_as_used(tmp_path):
    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        if trial.number == 1:
            raise optuna.TrialPruned("capped")
        return x

    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="pruned", n_trials=3)
    study = run_study(settings, objective)
    assert finished_trials(study) == 3
    assert len(study.trials) == 3


def test_invalid_settings_rejected():
    with pytest.raises(ConfigError, match="n_trials"):
        StudySettings(storage="sqlite:///x.db", study_name="s", n_trials=0)
    with pytest.raises(ConfigError, match="workers=0 must be >= 1"):
        StudySettings(storage="sqlite:///x.db", study_name="s", workers=0)
    with pytest.raises(ConfigError, match="'notaurl' is not a database URL"):
        StudySettings(storage="notaurl", study_name="s")


@pytest.mark.parametrize("args, expected", [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "random", "--budget", "2", "--trial-wall-cap-s", "nan"], "trial_wall_cap_s=nan"),
    (["--method", "random", "--budget", "2", "--trial-wall-cap-s", "-1"], "trial_wall_cap_s=-1.0"),
    (["--method", "random", "--budget", "2", "--seq-len", "0"], "seq_len=0"),
])
def test_tune_rejects_bad_arguments_before_loading(tmp_path, capsys, args, expected):
    # The dataset name is unknown too: each bad value must be caught before the data loads.
    code = main(["tune", "--dataset", "not-loaded", "--data-dir", str(tmp_path), "--out", str(tmp_path), *args])
    assert code == 2
    assert expected in capsys.readouterr().err


def test_tune_real_objective_on_steam_slice(shared_data, tmp_path):
    from bench.method import Budget
    from bench.runner import suite_from_mapping
    from bench.tune import tune

    suite = suite_from_mapping({
        "name": "t", "datasets": ["steam"], "methods": ["random"], "seeds": [0],
        "protocol": {"max_steps": 20, "eval_every": 10, "patience": 2},
        "learner": {"hidden": 16, "layers": 1, "max_len": 20}, "encoder": {"max_length": 32},
        "data": {"sample_users": 300, "sample_seed": 0},
    })
    settings = StudySettings(storage=f"sqlite:///{tmp_path / 'real.db'}", study_name="real", n_trials=5)
    summary = tune(suite, "steam", "random", Budget(10, 10), settings, data_dir=shared_data, out_dir=tmp_path)
    assert summary["trials_used"] == 1
    assert 0.0 <= summary["best_value"] <= 1.0
    assert (tmp_path / "tune" / "real.json").exists()
