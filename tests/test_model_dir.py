"""What the server takes from a --model folder: the tokens that end a generation, and the folders it refuses to
serve (not a complete decoder-only causal LM) with a one-line error at start-up."""
import json
import logging

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from clients.client import Client
from loader.base_model import load_base_model
from loader.default_model import build_model_dir, build_tokenizer
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import start_server, status_of


@pytest.fixture(scope="module")
def multi_eos(tmp_path_factory):
    """A model whose generation_config.json (not config.json, eos 2) also ends on the third greedy token of
    'hello', as instruct models list their end-of-turn ids; and what HF generate makes of it."""
    folder = build_model_dir(tmp_path_factory.mktemp("models") / "multi_eos", "llama", seed=3)
    ids = AutoTokenizer.from_pretrained(folder)("hello", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    end = greedy[2]
    assert end not in (2, *greedy[:2]), greedy  # the seed makes the third token the first end
    generation = GenerationConfig.from_pretrained(folder)
    generation.eos_token_id = [2, end]
    generation.save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert expected == greedy[:3]  # HF generate stops on generation_config.json's ids
    return folder, expected


def test_generation_config_eos_ids_end_a_generation_as_hf_generate_does(multi_eos, caplog):
    folder, expected = multi_eos
    with caplog.at_level(logging.INFO, logger="loraplex.model"):
        base = load_base_model(str(folder), "cpu", "float32")
    assert base.eos_token_ids == {2, expected[-1]}
    assert f"end-of-sequence token ids: [2, {expected[-1]}]" in caplog.text  # the set in force, logged at start
    server = start_server(folder, None)
    try:
        with Client(server.target, timeout=60) as client:
            reply = client.generate("hello", max_new_tokens=10)
        assert list(reply.token_ids) == expected
        assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    finally:
        server.stop()


def test_the_tokenizer_eos_counts_beside_the_configs(tmp_path):
    folder = build_model_dir(tmp_path / "m", "llama", seed=1, eos_token_id=[2, 7])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(9)
    tokenizer.save_pretrained(folder)
    assert load_base_model(str(folder), "cpu", "float32").eos_token_ids == {2, 7, 9}


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A tiny multimodal Gemma-3 saved as 4b/12b/27b-it are: vocab_size and max_position_embeddings only in
    text_config; and the model, for HF's own generate."""
    from transformers import Gemma3Config
    tokenizer = build_tokenizer()
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=3000, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"], vocab_size=len(tokenizer), pad_token_id=0,
                bos_token_id=1, eos_token_id=[2, 7])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=3,
                          boi_token_index=4, eoi_token_index=5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("models") / "gemma3-mm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert "vocab_size" not in saved and "max_position_embeddings" not in saved  # as the real checkpoints
    return folder, model


def test_a_multimodal_checkpoint_is_served_with_its_text_models_vocabulary_context_and_ends(gemma3_multimodal):
    """The server reads them there (its start failed on the missing vocab_size), and serves the text model as HF
    generate does."""
    folder, model = gemma3_multimodal
    tokenizer = build_tokenizer()
    prompt = [9, 10, 11, 12]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    server = start_server(folder, None)
    try:
        with Client(server.target, timeout=60) as client:
            info = client.server_info()
            assert (info.vocab_size, info.max_context_length) == (len(tokenizer), 3000)
            reply = client.generate(prompt, max_new_tokens=6, ignore_eos=True)
        assert list(reply.token_ids) == expected
        assert {2, 7} <= server.serving.engine.eos
    finally:
        server.stop()


def test_a_multimodal_checkpoints_vision_tower_is_not_adapted_and_peft_adapters_for_it_are_served_exactly(
        gemma3_multimodal, tmp_path):
    """A text forward never runs the vision tower: the server gives it no slots (9 of the tiny model's 23 modules
    were), and an adapter PEFT's all-linear trained on it too is served without those tensors, as PeftModel
    generates text with them."""
    from peft import PeftModel

    from tests.helpers import make_peft_adapter
    folder, model = gemma3_multimodal
    root = tmp_path / "adapters"
    make_peft_adapter(folder, root / "everything", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    make_peft_adapter(folder, root / "vision", seed=4, r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    old = root / "old"  # the same adapter as saved before transformers 4.52 renamed Gemma-3's modules (QA)
    old.mkdir()
    (old / "adapter_config.json").write_text((root / "everything" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file
    save_file({k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
               .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."): v
               for k, v in load_file(root / "everything" / "adapter_model.safetensors").items()},
              old / "adapter_model.safetensors", {"format": "pt"})
    from safetensors import safe_open
    with safe_open(root / "everything" / "adapter_model.safetensors", "pt") as saved:
        assert any(".vision_tower." in key for key in saved.keys())  # what the test is about
    prompt = [9, 10, 11, 12]
    with torch.no_grad():
        base = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        peft = PeftModel.from_pretrained(model, root / "everything").eval()  # into `model` itself
        expected = peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    peft.unload()  # the fixture's model is shared: take PEFT's layers out again
    assert expected != base  # the adapter changes the text model's output
    server = start_server(folder, root)
    try:
        adapted = [s.name for s in server.serving.engine.bank.shapes]
        assert len(adapted) == 14 and all(name.startswith("model.language_model.") for name in adapted)
        with Client(server.target, timeout=60) as client:
            reply = client.generate(prompt, adapter_id="everything", max_new_tokens=6, ignore_eos=True)
            renamed = client.generate(prompt, adapter_id="old", max_new_tokens=6, ignore_eos=True)
            info = client.get_adapter("everything")
            code, message = status_of(client.load_adapter, "vision")
        assert list(reply.token_ids) == expected == list(renamed.token_ids)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "never runs (model.vision_tower" in message
        assert sorted(info.target_modules) == sorted(adapted)
    finally:
        server.stop()


def test_an_adalora_adapter_in_the_older_layout_has_its_rank_pattern_renamed_too(gemma3_multimodal, tmp_path):
    """An AdaLoRA rank_pattern names modules as the tensors do: saved before transformers 4.52, both name
    `language_model.model.*`; renaming the tensors alone refused the adapter with a shape error (QA)."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import make_peft_adalora
    folder, _ = gemma3_multimodal
    root = tmp_path / "adapters"
    # the text model's only: a text forward gives the vision tower's no gradients, which PEFT's allocator needs
    make_peft_adalora(folder, root / "new", seed=5, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    config = json.loads((root / "new" / "adapter_config.json").read_text())
    ranks = {sum(mask) for mask in config["rank_pattern"].values()}
    assert len(ranks) > 1 and all(key.startswith("model.language_model.") for key in config["rank_pattern"])

    def older(key: str) -> str:
        return key.replace("model.language_model.", "language_model.model.")
    (root / "old").mkdir()
    config["rank_pattern"] = {older(key): mask for key, mask in config["rank_pattern"].items()}
    (root / "old" / "adapter_config.json").write_text(json.dumps(config))
    save_file({older(k): v for k, v in load_file(root / "new" / "adapter_model.safetensors").items()},
              root / "old" / "adapter_model.safetensors", {"format": "pt"})
    server = start_server(folder, root)
    try:
        with Client(server.target, timeout=60) as client:
            new, old = (client.generate([9, 10, 11, 12], adapter_id=a, max_new_tokens=6, ignore_eos=True)
                        for a in ("new", "old"))
            assert list(new.token_ids) == list(old.token_ids)
            assert client.get_adapter("old").module_ranks == client.get_adapter("new").module_ranks
    finally:
        server.stop()


def test_keys_in_a_models_current_layout_are_never_renamed():
    """Review: transformers' renamings are for older checkpoints, and some are not idempotent (Laguna's
    "mlp.shared_expert." pattern turned shared_experts.gate_proj into shared_experts..gate_proj): an adapter for the
    model as it is now was refused."""
    from transformers import CONFIG_MAPPING

    from loader.key_layout import key_layout
    config = CONFIG_MAPPING["laguna"]()
    for key, value in dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                           shared_expert_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, vocab_size=64, num_experts=4, num_experts_per_tok=2).items():
        if hasattr(config, key):
            setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    layout = key_layout(model)
    assert layout.renamings  # what the test is about
    rename = layout.renamer()
    keys = [f"{name}.lora_{part}" for name, _ in model.named_modules() for part in ("A.weight", "B.0.weight", "E")]
    assert any(".shared_experts." in key for key in keys)
    assert [rename(key) for key in keys] == keys


def test_a_multimodal_models_modules_beside_its_text_model_that_a_text_forward_runs_stay_adaptable(caplog):
    """Gemma-3n embeds the multimodal token ids of a text through embed_vision/embed_audio, siblings of its text
    model (review): only the siblings that a forward of text ids does not run are left out (a probe, with the
    training's random draws left as they were)."""
    from types import SimpleNamespace

    from torch import nn

    from adapters.targets import linear_modules, never_run

    class Config:  # multimodal: its text config is another object
        text = SimpleNamespace(vocab_size=10)

        def get_text_config(self):
            return self.text

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.embed, self.embed_extra, self.tower = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.text, self.head, self.drop = nn.Linear(4, 4), nn.Linear(4, 10), nn.Dropout(0.5)

        def get_decoder(self):
            return self.text

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, **kwargs):  # the tower runs only on images, which a text request never has
            return self.head(self.drop(self.text(self.embed_extra(self.embed(input_ids)))))
    model = Model().train()
    model.tower.eval()  # (each module's mode is kept: train() would set them all as the root)
    expected = torch.manual_seed(0) and torch.rand(1)
    torch.manual_seed(0)
    assert never_run(model) == ("tower",)  # embed_extra and drop ran
    assert torch.equal(torch.rand(1), expected)  # no draw taken: a seeded run stays the same
    assert model.training and model.drop.training and not model.tower.training

    class NeedsImages(Model):
        def forward(self, input_ids, **kwargs):
            raise ValueError("pixel_values are required")
    with caplog.at_level(logging.WARNING, logger="loraplex.adapters"):
        assert never_run(NeedsImages()) == ()  # proves nothing: all stays adaptable, said
    assert "a forward of text ids alone failed (ValueError: pixel_values are required)" in caplog.text
    assert [name for name, _ in linear_modules(model)] == ["embed_extra", "text"]


@pytest.mark.parametrize("method", ["lora", "reslora"])
def test_adapters_train_on_a_multimodal_checkpoints_text_model(gemma3_multimodal, tmp_path, method):
    """Training reads the text model's settings too (ResLoRA's layer count failed with a traceback), and trains
    the text model's modules only (--target-modules q_proj,v_proj named the vision tower's too)."""
    from adapters.training import TrainSettings
    from loader.train_job_spec import TrainJob
    from loader.training_job import run_job
    folder, _ = gemma3_multimodal
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i} ", "completion": "world"}) + "\n" for i in range(4)))
    out = tmp_path / method
    run_job(TrainJob(method=method, data=str(data), out=str(out), model=str(folder), max_length=32,
                     target_modules=["q_proj", "v_proj"], settings=TrainSettings(max_steps=2)))
    trained = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert len(trained) == 4 and all(name.startswith("model.language_model.") for name in trained)


def _folders(root):
    """Folders that are not a complete decoder-only causal LM with its tokenizer, each with a phrase its refusal
    must contain."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertLMHeadModel, BertModel, T5Config, T5ForConditionalGeneration
    good = build_model_dir(root / "llama", "llama", seed=1)
    tokenizer_files = [p for p in good.iterdir() if p.name.startswith("tokenizer")]

    def folder(name, save=None, files=("config.json",)):
        out = root / name
        if save is not None:
            save.save_pretrained(out)
        out.mkdir(exist_ok=True)
        for path in [*tokenizer_files, *(good / f for f in files)]:
            if not (out / path.name).exists():
                shutil.copy(path, out / path.name)
        return out
    bert = BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cases = {
        # a BERT encoder: loads as BertLMHeadModel with an untrained head
        "bert": (folder("bert", BertModel(bert)), "lack 6 tensors of BertLMHeadModel"),
        # a complete BertLMHeadModel, but bidirectional (is_decoder false)
        "bert_lm": (folder("bert_lm", BertLMHeadModel(bert)), "BertLMHeadModel is not a causal LM"),
        "t5": (folder("t5", T5ForConditionalGeneration(T5Config(vocab_size=259, d_model=16, d_ff=16, num_layers=1,
                                                                 num_heads=2, d_kv=8))), "encoder-decoder"),
        "no_weights": (folder("no_weights"), "no file named model.safetensors"),
        "bad_json": (folder("bad_json", files=()), "config.json cannot be read as a model configuration"),
        "no_model_type": (folder("no_model_type", files=()), "config.json cannot be read as a model configuration"),
    }
    (cases["bad_json"][0] / "config.json").write_text("{not json")
    (cases["no_model_type"][0] / "config.json").write_text(json.dumps({"hidden_size": 64}))
    partial = root / "partial"  # a truncated download: one layer's MLP is not in the file
    shutil.copytree(good, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0.mlp" not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    cases["partial"] = (partial, "lack 3 tensors of LlamaForCausalLM (model.layers.0.mlp.down_proj.weight")
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(good, no_tokenizer)
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    cases["no_tokenizer"] = (no_tokenizer, "has no tokenizer")
    return cases


@pytest.fixture(scope="module")
def unservable(tmp_path_factory):
    return _folders(tmp_path_factory.mktemp("unservable"))


@pytest.mark.parametrize("name", ["bert", "bert_lm", "t5", "no_weights", "bad_json", "no_model_type", "partial",
                                  "no_tokenizer"])
def test_a_folder_that_is_not_a_complete_causal_lm_is_refused(unservable, name):
    from loader.base_model import UnservableModel
    folder, needle = unservable[name]
    with pytest.raises(UnservableModel) as info:
        load_base_model(str(folder), "cpu", "float32")
    assert needle in str(info.value) and str(folder) in str(info.value), info.value


def test_weights_tied_to_others_are_not_missing(tmp_path):
    """An LM head tied to the embedding is not in the weights file, and is not random."""
    folder = build_model_dir(tmp_path / "tied", "qwen2", seed=1, tie_word_embeddings=True)
    base = load_base_model(str(folder), "cpu", "float32")
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()


def test_serve_refuses_such_a_folder_in_one_line(unservable):
    import subprocess
    import sys
    from pathlib import Path
    folder, needle = unservable["partial"]
    result = subprocess.run([sys.executable, "-c", "from clients.cli import main; main()", "serve", "--model",
                             str(folder), "--port", "0", "--metrics-port", "0"], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --model: {folder}: the weights files ") \
        and needle in errors[0], result.stderr


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_causality_probe_tells_encoders_from_decoders_moe_included(seed, dtype):
    """Random tiny BERTs (whose first logits move least) are refused whatever the seed; mixture-of-experts decoders,
    whose expert batches follow the other tokens, pass in fp32 and bf16."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel, Qwen3MoeConfig

    from loader.base_model import UnservableModel, _check_causal
    torch.manual_seed(seed)
    bert = BertLMHeadModel(BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)).eval()
    if dtype == torch.float32:  # a tiny random BERT moves its first logits by 0.2-0.5%: within bf16's tolerance
        with pytest.raises(UnservableModel, match="is not a causal LM"):
            _check_causal(bert, Path("bert"))
    moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=259, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, head_dim=16))
    _check_causal(moe.to(dtype).eval(), Path("moe"))


def test_a_half_precision_model_on_a_cpu_without_its_instructions_is_warned_about():
    from loader.base_model import slow_dtype_warning
    avx2 = {"avx", "avx2", "fma"}
    assert "--dtype bfloat16 on a CPU without avx512_bf16 or amx_bf16" in slow_dtype_warning("cpu", "bfloat16", avx2)
    assert "--dtype float16 on a CPU without avx512_fp16 or amx_fp16" in slow_dtype_warning("cpu", "float16", avx2)
    assert slow_dtype_warning("cpu", "bfloat16", avx2 | {"avx512_bf16"}) is None
    assert slow_dtype_warning("cpu", "float16", avx2 | {"amx_fp16"}) is None
    assert slow_dtype_warning("cpu", "float32", avx2) is None and slow_dtype_warning("cuda", "bfloat16", avx2) is None
