"""What a run reads before step 0: the privileged and plain teacher contexts."""

import json
import shutil

import torch

from opd_local.config import Config
from opd_local.preflight import check_config, resolve
from opd_local.run_inputs import load_run_inputs as load_resolved


def load_run_inputs(cfg):
    """What train() does first: the pre-flight checks, the settled values, then the inputs."""
    return load_resolved(cfg, resolve(check_config(cfg), torch.device("cpu")))


def _inputs(tiny_model_dir, context):
    cfg = Config()
    cfg.model.student = tiny_model_dir
    cfg.model.teacher_context = context
    cfg.data.max_train_rows = 4
    cfg.data.max_heldout_rows = 2
    return load_run_inputs(cfg)


def test_plain_and_privileged_teacher_inputs_differ_for_the_same_row(tiny_model_dir):
    inputs = _inputs(tiny_model_dir, "plain")
    for group in inputs.train_groups + inputs.heldout_groups:
        plain = group.training_teacher_prompt("plain")
        privileged = group.training_teacher_prompt("privileged")
        assert plain == group.student_prompt_ids  # plain: the teacher sees what the student sees
        assert privileged == group.teacher_prompt_ids and len(privileged) > len(plain)
        solution_line = group.row.privileged.splitlines()[0]
        assert solution_line in inputs.tokenizer.decode(privileged)
        assert solution_line not in inputs.tokenizer.decode(plain)


def test_a_row_whose_hint_the_chat_template_drops_is_refused_under_privileged_only(tiny_model_dir, tmp_path):
    """The rows pass the text check (the teacher's messages hold a hint); the template never renders it."""
    import pytest

    from opd_local.rows import DataError

    model = shutil.copytree(tiny_model_dir, tmp_path / "skips-system")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    question = {"role": "user", "content": "What is 6 * 7?"}
    row = {"messages": [question], "teacher_messages": [{"role": "system", "content": "Hint: 6 * 7 = 42."}, question],
           "answer": "42", "privileged": "Hint: 6 * 7 = 42."}
    (tmp_path / "heldout.jsonl").write_text(json.dumps(row) + "\n")
    cfg = Config()
    cfg.model.student = str(model)
    cfg.data.max_train_rows, cfg.data.heldout = 2, str(tmp_path / "heldout.jsonl")
    with pytest.raises(DataError, match=r"heldout.jsonl#0: field 'teacher_messages': its rendered prompt adds nothing"):
        load_run_inputs(cfg)  # the bundled training rows pass: their hint is in the user turn
    cfg.model.teacher_context = "plain"  # the control run: nothing privileged is expected
    assert len(load_run_inputs(cfg).heldout_groups) == 1


def test_plain_teacher_run_trains(tiny_model_dir, tmp_path):
    from opd_local.loop import train
    from opd_local.metrics import read_metrics
    from test_loop import tiny_config

    cfg = tiny_config(tiny_model_dir, tmp_path / "plain")
    cfg.model.teacher_context = "plain"
    cfg.eval.every = 2
    cfg.eval.train_rows = 1
    cfg.eval.max_trace_tokens = cfg.eval.greedy_max_tokens = 8
    records = read_metrics(train(cfg))
    # teacher = the student's starting weights on the student's own prompt: at step 0 the teacher
    # and the rollout engine compute the same distribution, so the sampled reverse KL is ~0
    assert abs(records[0]["opd/sampled_reverse_kl"]) < 1e-4
    assert records[1]["opd/active_tokens"] > 0
    # ...while the evaluation still measures the gap to the privileged teacher's traces, which is not 0
    assert abs(records[0]["eval/trace_gap"]) > 1e-3


def test_teacher_weights_resolve_and_contradictions_are_refused():
    import pytest

    from opd_local.config import ModelConfig
    from opd_local.preflight import resolve_teacher_weights

    assert resolve_teacher_weights(ModelConfig()) == "initial"
    assert resolve_teacher_weights(ModelConfig(lora_rank=4)) == "base_adapter_off"
    assert resolve_teacher_weights(ModelConfig(teacher="some/model", lora_rank=4)) == "separate"
    assert resolve_teacher_weights(ModelConfig(teacher_weights="initial", lora_rank=4)) == "initial"
    with pytest.raises(ValueError, match="needs model.teacher"):
        resolve_teacher_weights(ModelConfig(teacher_weights="separate"))
    with pytest.raises(ValueError, match="needs a LoRA student"):
        resolve_teacher_weights(ModelConfig(teacher_weights="base_adapter_off"))
    with pytest.raises(ValueError, match="but model.teacher is set"):
        resolve_teacher_weights(ModelConfig(teacher_weights="initial", teacher="some/model"))
    with pytest.raises(ValueError, match="model.teacher_weights: 'frozen' is not one of auto, initial, separate"):
        check_config(Config(model=ModelConfig(teacher_weights="frozen")))  # the config's Literal is the one list


def test_a_teacher_tokenizer_needs_the_same_ids_not_a_chat_template(tiny_model_dir, tiny_teacher_dir, tmp_path):
    """Both prompts are rendered by the student's tokenizer: a base teacher behind an instruct student is fine."""
    teacher = shutil.copytree(tiny_teacher_dir, tmp_path / "base-teacher")
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = Config()
    cfg.model.student, cfg.model.teacher = tiny_model_dir, str(teacher)
    cfg.data.max_train_rows, cfg.data.max_heldout_rows = 2, 1
    inputs = load_run_inputs(cfg)
    assert inputs.teacher_path == str(teacher) and inputs.train_groups


def test_a_context_is_claimed_only_where_the_config_settles_it():
    from transformers import LlamaConfig

    from opd_local.preflight import context_limit

    assert context_limit(LlamaConfig(max_position_embeddings=2048)) == 2048
    # Linear RoPE scaling runs past max_position_embeddings, and vLLM multiplies it by the factor: no limit claimed
    assert context_limit(LlamaConfig(max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 4.0})) is None
