"""`rlhf.rejection.teacher`: another model samples for the one being fine-tuned (the paper's 70B
sampling for the smaller models). Resolved from a registry alias, a path or an HF export, the
samples must be the teacher's, not the student's."""

import numpy as np
import pytest

from model.chat import Dialogue, Turn
from model.generate import SamplingParams, TorchSampler
from steps.rejection import fingerprint_inputs, load_sampling_model, resolve_teacher, sample_and_score
from tests.test_rejection_tune import WORDS, make_models

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3, seed=5)
QUESTIONS = ("hello", "what is two plus three", "the capital of the river country")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.conftest import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("teacher")
    tok = train_tiny_tokenizer(root, WORDS)
    return tok, make_models(root, tok, {"student": 1, "teacher": 9, "rm_helpfulness": 2, "rm_safety": 3})


def own_answers(model_dir) -> list[list[str]]:
    """What a model says itself (the sampler over its own weights), grouped per prompt."""
    from model.chat import encode_prompt

    model, tok = load_sampling_model(model_dir)
    samples = TorchSampler(model, tok.eos_id, tok.pad_id).generate(
        [encode_prompt(tok, Dialogue([Turn("user", q)])) for q in QUESTIONS], PARAMS)
    texts = [tok.decode(s.tokens).strip() for s in samples]
    return [texts[i * 3:(i + 1) * 3] for i in range(len(QUESTIONS))]


def sample_with(model_dir, m) -> tuple[list[list[str]], dict]:
    rm_dirs = {"helpfulness": str(m["rm_helpfulness"]), "safety": str(m["rm_safety"])}
    return sample_and_score(str(model_dir), rm_dirs, [Dialogue([Turn("user", q)]) for q in QUESTIONS],
                            [[] for _ in QUESTIONS], PARAMS, 2)


def tracked_ctx(tmp_path, step: str, uri: str, exp: str):
    from pipelines.config import load_config
    from pipelines.runner import StepContext, StepSpec
    from pipelines.tracking import Tracking, start_run
    from steps import rejection

    tracking = Tracking(uri, exp)
    return StepContext(load_config(None), StepSpec(step, rejection, "rlhf", ()), tmp_path / step / "out",
                       tmp_path / step / "work", tracking, start_run(tracking, step, {"step": step}))


@pytest.mark.slow  # an MLflow sqlite store and three registrations: tens of seconds on 2 cores
def test_a_registered_alias_samples_with_the_teachers_weights(tmp_path, models):
    from model.config import ModelConfig
    from model.hf import export_hf
    from pipelines.tracking import setup_experiment

    tok, m = models
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = setup_experiment(uri, "teacher-test", tmp_path / "mlartifacts")
    # an earlier step registered the teacher as this run's chat model `rlhf-v2`, and the runner
    # tagged its run with the artifact's directory (as pipelines/runner.py does)
    earlier = tracked_ctx(tmp_path, "rs_v2", uri, exp)
    cfg = ModelConfig.model_validate_json((m["teacher"] / "model_config.json").read_text())
    hf = export_hf(m["teacher"] / "model.safetensors", cfg, tmp_path / "hf", tokenizer_model=tok.model_path)
    name = f"{earlier.cfg.run.name}-chat"
    earlier.register_model(name, hf, "rlhf-v2")
    earlier.set_tags({"artifact_path": str(m["teacher"])})
    # another registered model (e.g. a bigger run's) whose run names no artifact directory: its HF export
    tracked_ctx(tmp_path, "elsewhere", uri, exp).register_model("big-chat", hf, "rlhf-v3")

    ctx = tracked_ctx(tmp_path, "rs_v3", uri, exp)
    path, info = resolve_teacher(ctx, "rlhf-v2")
    assert path == m["teacher"] and info["teacher.version"] == "1" and info["teacher.model"] == name
    exported, info = resolve_teacher(ctx, "big-chat@rlhf-v3")
    assert (exported / "config.json").exists() and info["teacher.alias"] == "rlhf-v3"
    with pytest.raises(ValueError, match="no model"):
        resolve_teacher(ctx, "rlhf-v9")

    teacher_says, student_says = own_answers(m["teacher"]), own_answers(m["student"])
    assert teacher_says != student_says
    for resolved in (path, exported):  # the artifact and its HF export sample alike
        answers, probs = sample_with(resolved, m)
        assert answers == teacher_says
        assert probs["helpfulness"].shape == (3, 3) and np.isfinite(probs["safety"]).all()


def test_a_path_teacher_is_fingerprinted_by_its_files(tmp_path, models):
    from pipelines.config import load_config

    tok, m = models
    cfg = load_config(None)
    assert fingerprint_inputs(cfg, iteration=1) is None  # no teacher: the model itself samples
    with_teacher = cfg.model_copy(deep=True)
    with_teacher.rlhf.rejection.teacher = str(m["teacher"])
    first = fingerprint_inputs(with_teacher, iteration=1)
    assert first and first == fingerprint_inputs(with_teacher, iteration=1)
    (m["teacher"] / "model_config.json").write_text((m["teacher"] / "model_config.json").read_text() + "\n")
    assert fingerprint_inputs(with_teacher, iteration=1) != first
