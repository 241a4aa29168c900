"""The whole suite, through the public functions the notebooks call, on a tiny random model of every family.

For each case of ``tests/tiny_models.py`` (every model type that maps to a ``FamilySpec``), a 2-layer model
with SmolLM2's tokenizer is saved with ``save_pretrained`` and loaded by path with ``load_model``, as a user's
folder would be. Each step is checked against a recomputation that does not go through ffnlib's hooks:

- mining (both signs where gated): every stored coefficient at its stored position equals an independent
  forward hook on the input of the FFN's second linear (reshaped by hand: OPT flattens the tokens), to 1e-5;
- the removal experiment: the coefficients read from the modified prefixes, the same way;
- value projection: each value's top token against the adapter's own projection of the written value;
- aggregation: the model's prediction and the counts of positive coefficients against a plain forward pass;
- the explorer's prompt view: its coefficients against the independent hook;
- an intervention: switching a memory off (or doubling it) equals editing its value in a copy of the weights;
- the atlas: a page per chosen memory, showing its strongest trigger example;
- knowledge neurons (06): the last layer's integrated-gradients scores add up to F(m) - F(0), and the fast path
  gives captum's numbers;
- MoEfication (07): its reading of the FFN is the model's, and the expert-sparse FFN equals the masked dense one;
- ReLU vs softmax (08): the top-mass share of a pretrained model against the oracle's coefficients;
- corpus size (10): the snapshots' measures, from the mined snapshots, up to the whole corpus.

Notebook 09's decomposition is checked on every family in ``tests/test_contextualization.py``.
"""

from __future__ import annotations

import copy
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ffnlib.aggregation import analyse_aggregation
from ffnlib.capture import capture
from ffnlib.corpus import load_corpus
from ffnlib.explorer import analyse_prompt, memory_view
from ffnlib.interventions import intervene
from ffnlib.keys import mine_trigger_examples, removal_experiment, removal_plan
from ffnlib.corpus_size import snapshot_measures
from ffnlib.models import LoadedModel, load_model
from ffnlib.related import knowledge_neurons as kn
from ffnlib.related import moefication as moe
from ffnlib.related.relu_softmax import pretrained_top_mass, top_mass
from ffnlib.values import project_values, top_trigger_targets
from ffnlib.widgets.atlas import export_atlas
from tiny_models import CASE_IDS, CASES, Case, build_config

K = 4  # trigger examples per memory
PROMPT = "The capital of France is"


@dataclass
class FamilyRun:
    case: Case
    loaded: LoadedModel
    examples: object  # ffnlib.keys.TriggerExamples
    out: Path


def oracle_coefficients(loaded: LoadedModel, ids: list[int], layer: int) -> torch.Tensor:
    """The coefficients (tokens, d_ff) of one sequence in ``layer``: the input of the FFN's second linear,
    read by a plain forward pre-hook on that module (no ffnlib hooks), reshaped by hand."""
    seen = {}
    handle = loaded.adapter.down(layer).register_forward_pre_hook(
        lambda module, args: seen.__setitem__("m", args[0].detach().clone()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["m"].reshape(len(ids), -1)  # OPT runs its FFN on (tokens, d_ff) already flattened


def assert_close(actual, expected, what: str, tol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected).max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.fixture(scope="module")
def sentences():
    return load_corpus("wiki", split="train", seed=0, max_sentences=36)


@pytest.fixture(scope="module")
def family_run(smollm, sentences, tmp_path_factory):
    """``family_run(case)``: the case's model saved to a folder with a tokenizer, loaded by path, and mined."""
    runs: dict[str, FamilyRun] = {}

    def get(case: Case) -> FamilyRun:
        if case.id not in runs:
            folder = tmp_path_factory.mktemp(f"family-{case.id}")
            torch.manual_seed(0)
            model = case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=512)).float().eval()
            with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so gains and biases matter
                for param in model.parameters():
                    if param.dim() == 1:
                        param.add_(0.2 * torch.randn_like(param))
            model.save_pretrained(folder / "model")
            smollm.tokenizer.save_pretrained(folder / "model")
            loaded = load_model(str(folder / "model"))
            examples = mine_trigger_examples(loaded, sentences, k=K, batch_tokens=256, out_dir=folder / "results",
                                             progress=False)
            runs[case.id] = FamilyRun(case, loaded, examples, folder)
        return runs[case.id]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, above all on a busy machine
    try:
        yield get
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mining_matches_an_independent_hook(case, family_run):
    run = family_run(case)
    adapter, t = run.loaded.adapter, run.examples.triggers
    assert run.loaded.adapter.family.name == case.family
    assert set(t["sign"].unique()) == ({1, -1} if adapter.gated else {1})
    assert len(t) == len(set(t["sign"])) * adapter.n_layers * adapter.d_ff * K
    tokens = run.examples.token_index()
    for sentence_id, rows in t.groupby("sentence_id"):
        ids = tokens[int(sentence_id)]
        for layer, at_layer in rows.groupby("layer"):
            m = oracle_coefficients(run.loaded, ids, int(layer)).numpy()
            assert_close(at_layer["coefficient"], m[at_layer["position"], at_layer["memory"]],
                         f"sentence {sentence_id} layer {layer}")
            maxima = np.where(at_layer["sign"] == 1, m[:, at_layer["memory"]].max(0), m[:, at_layer["memory"]].min(0))
            assert_close(at_layer["coefficient"], maxima, "one prefix per sentence: the key's extreme in it")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_removal_experiment_reads_the_modified_prefixes(case, family_run):
    run = family_run(case)
    result = removal_experiment(run.loaded, run.examples, n_keys=3, top=K, seed=1, out_dir=run.out / "results",
                                progress=False)
    reads, sequences = removal_plan(run.examples, run.loaded.adapter.d_ff, run.examples.layers, 3, K, seed=1)
    assert len(result) == len(reads) and set(result["variant"]) == {"first", "last", "random"}
    for row in reads.sample(n=min(12, len(reads)), random_state=0).itertuples():
        m = oracle_coefficients(run.loaded, sequences[row.sequence], int(row.layer))
        got = result[(result["layer"] == row.layer) & (result["memory"] == row.memory) & (result["rank"] == row.rank)
                     & (result["variant"] == str(row.variant))]["new_coefficient"]
        assert_close(got.to_numpy(), [float(m[row.read_at, row.memory])], f"removal read {row}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_value_projection(case, family_run):
    run = family_run(case)
    adapter = run.loaded.adapter
    projection = project_values(run.loaded, top_k=3, targets=top_trigger_targets(run.examples.triggers),
                                out_dir=run.out / "results", progress=False)
    signs = (1, -1) if adapter.gated else (1,)
    assert len(projection.memories) == adapter.n_layers * adapter.d_ff * len(signs)
    for layer in range(adapter.n_layers):
        for sign in signs:
            expected = adapter.logits_from_values(sign * adapter.written_values(layer)).argmax(-1)
            for memory in (0, adapter.d_ff // 2, adapter.d_ff - 1):
                assert int(projection.of(layer, memory, sign)["token"].iloc[0]) == int(expected[memory])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_aggregation_against_a_plain_forward_pass(case, family_run):
    run = family_run(case)
    adapter = run.loaded.adapter
    result = analyse_aggregation(run.loaded, n_examples=8, batch_tokens=256, out_dir=run.out / "results",
                                 value_cache=run.out / "values", progress=False)
    frame, examples = result.frame, result.examples
    assert len(frame) == len(examples) * adapter.n_layers
    last = frame[frame["layer"] == adapter.n_layers - 1]
    assert (last["output_top"] == last["final_top"]).all()  # the last layer's output is the prediction
    for example in examples.head(3).itertuples():
        ids = list(example.token_ids[: example.position + 1])
        with torch.no_grad():
            logits = run.loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        rows = frame[frame["example"] == example.example]
        assert (rows["final_top"] == int(logits.argmax())).all()
        for layer in range(adapter.n_layers):
            m = oracle_coefficients(run.loaded, ids, layer)[-1]
            assert int(rows[rows["layer"] == layer]["n_positive"].iloc[0]) == int((m > 0).sum())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_explorer_prompt_view_and_memory_view(case, family_run):
    run = family_run(case)
    loaded = run.loaded
    analysis = analyse_prompt(loaded, PROMPT, top_memories=3)
    for layer, rows in analysis.memories.groupby("layer"):
        m = oracle_coefficients(loaded, analysis.token_ids, int(layer))[-1].numpy()
        assert_close(rows["coefficient"], m[rows["memory"]], f"prompt view layer {layer}")
    layer, memory = loaded.adapter.n_layers - 1, 1
    view = memory_view(loaded, run.examples, layer, memory, n_triggers=3, k_tokens=3)
    top = run.examples.of(layer, memory).iloc[0]
    assert view.side(1).triggers["coefficient"].iloc[0] == pytest.approx(float(top["coefficient"]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_intervention_equals_editing_the_weights(case, family_run):
    run = family_run(case)
    loaded = run.loaded
    ids = torch.tensor([loaded.encode(PROMPT)])
    for layer, factor in ((0, 0.0), (1, 2.0)):
        memory = int(oracle_coefficients(loaded, ids[0].tolist(), layer)[-1].abs().argmax())  # an active one
        edited = copy.deepcopy(loaded.model)
        values = LoadedModel(loaded.name, edited, loaded.tokenizer, type(loaded.adapter)(edited), loaded.source,
                             loaded.file_hash).adapter.values(layer)
        with torch.no_grad():
            values[memory] *= factor  # a view of the module's weight, whatever its orientation
            expected = edited(input_ids=ids).logits
            with intervene(loaded, {(layer, memory): factor}, scale=True):
                got = loaded.model(input_ids=ids).logits
            plain = loaded.model(input_ids=ids).logits
        assert_close(got, expected, f"intervention on memory {memory} of layer {layer}", tol=1e-4)
        assert not torch.allclose(plain, expected), "the edit must change the output"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_atlas_pages(case, family_run):
    run = family_run(case)
    index = export_atlas(run.loaded, run.examples, run.out / "atlas", per_layer=1, n_triggers=3, k_tokens=3)
    pages = sorted((index.parent / "memories").glob("L*_M*.html"))
    assert len(pages) == run.loaded.adapter.n_layers
    tokens = run.examples.token_index()
    for page in pages:
        layer, memory = (int(part[1:]) for part in page.stem.split("_"))
        top = run.examples.of(layer, memory).iloc[0]
        last_token = run.loaded.tokenizer.decode([tokens[int(top["sentence_id"])][int(top["position"])]]).strip()
        assert html.escape(last_token) in page.read_text(), f"{page.name} does not show its strongest trigger"
        assert f"memories/{page.name}" in (index.parent / "layers" / f"layer_{layer:02d}.html").read_text()


# ---- the related work (notebooks 06, 07, 08, 10) on every family --------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_knowledge_attribution_completeness_and_captum(case, family_run):
    loaded = family_run(case).loaded
    prompt = loaded.encode(PROMPT)
    answer = loaded.tokenizer(" Paris", add_special_tokens=False)["input_ids"][:1]
    last, d_ff = loaded.adapter.n_layers - 1, loaded.adapter.d_ff
    # the log-probability: a random model gives " Paris" a probability near 1/vocabulary, too small to compare
    target = dict(layers=[last], target="answer_logprob")
    result = kn.knowledge_attribution(loaded, prompt, answer, steps=16, method="gausslegendre", **target)
    zeroed = kn.answer_probabilities(loaded, [prompt], answer, [{(last, i): 0.0 for i in range(d_ff)}])
    change = result.value + zeroed["nll"].item()  # log p(answer) - log p(answer | the layer's m = 0)
    assert abs(change) > 1e-4, "the layer's memories move the answer"
    assert float(result.scores.sum()) == pytest.approx(change, abs=5e-6), "completeness (nll is float32)"
    fast = kn.knowledge_attribution(loaded, prompt, answer, steps=4, implementation="fast", **target)
    slow = kn.knowledge_attribution(loaded, prompt, answer, steps=4, implementation="captum", **target)
    assert_close(fast.scores, slow.scores, "fast path against captum (float32 model)", tol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_expert_ffn_equals_the_masked_dense_ffn(case, family_run):
    loaded = family_run(case).loaded
    adapter = loaded.adapter
    ids = loaded.encode(PROMPT)
    size = moe.default_expert_size(adapter.d_ff, preferred=8)
    for layer in range(adapter.n_layers):
        with torch.inference_mode(), capture(loaded, layer, what=("ffn_input", "coefficients")) as acts:
            loaded.model(input_ids=torch.tensor([ids]))
        x, m = acts.ffn_input[layer][0], acts.coefficients[layer][0]
        assert_close(m, oracle_coefficients(loaded, ids, layer), f"captured coefficients, layer {layer}")
        assert_close(moe.ffn_coefficients(adapter, layer, x), m, f"MoEfication's reading of layer {layer}")
        ffn = moe.ExpertFFN.from_layer(adapter, layer, moe.random_split(adapter.d_ff, size, seed=layer))
        chosen = moe.route_random(x.shape[0], ffn.n_experts, max(1, ffn.n_experts // 2), seed=layer)
        with torch.inference_mode():
            assert_close(ffn.forward(x, chosen), moe.dense_ffn(adapter, layer, x, ffn.memory_mask(chosen)),
                         f"expert-sparse FFN, layer {layer}")
            everything = torch.arange(ffn.n_experts).expand(x.shape[0], -1)
            assert_close(ffn.forward(x, everything), adapter.down(layer)(m), f"every expert, layer {layer}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_top_mass_and_corpus_size_snapshots(case, family_run):
    run = family_run(case)
    loaded = run.loaded
    ids = loaded.encode(PROMPT)
    expected = np.nanmean([float(top_mass(oracle_coefficients(loaded, ids, layer)).nanmean())
                           for layer in range(loaded.adapter.n_layers)])
    assert pretrained_top_mass(loaded, [PROMPT]) == pytest.approx(expected, rel=1e-5)
    measures = snapshot_measures(loaded, run.examples, out_dir=run.out / "results", n_boot=20, progress=False)
    sizes = sorted(measures["sentences"].unique())
    assert len(sizes) >= 2 and sizes[-1] == len(run.examples.sentences)
    assert measures.groupby("sentences")["key"].apply(set).map(len).nunique() == 1  # every finding at every size
    shares = measures[measures["key"].str.contains("share|agree", regex=True)]["value"].dropna()
    assert len(shares) and shares.between(0, 1).all()


def test_every_family_is_in_the_matrix():
    from ffnlib.adapters import FAMILIES

    assert {case.family for case in CASES} == {family.name for family in FAMILIES}


# ---- model kinds a user will bring --------------------------------------------------------------------
def _case(case_id: str) -> Case:
    return CASES[CASE_IDS.index(case_id)]


def _save(case: Case, folder: Path, tokenizer, **config_changes) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_config(case, vocab=len(tokenizer), positions=512)
    for name, value in config_changes.items():
        setattr(config, name, value)
    model = case.model_cls(config).float().eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case_id, tied", [("gpt2", True), ("llama", False), ("opt", True), ("qwen2", False)])
def test_tied_and_untied_heads_project_through_the_models_own_head(case_id, tied, smollm, tmp_path):
    model = _save(_case(case_id), tmp_path, smollm.tokenizer, tie_word_embeddings=tied)
    loaded = load_model(str(tmp_path))
    adapter = loaded.adapter
    embeddings = loaded.model.get_input_embeddings().weight
    assert (adapter.head.weight.data_ptr() == embeddings.data_ptr()) == tied
    values = adapter.values(1)[:6]
    centred = values - values.mean(-1, keepdim=True) if adapter.is_layernorm() else values
    with torch.no_grad():
        by_head = (centred * adapter.norm_gain()) @ adapter.head.weight.T
        by_embeddings = (centred * adapter.norm_gain()) @ embeddings.T
        head_bias = getattr(adapter.head, "bias", None)
        if head_bias is not None:
            by_head = by_head + head_bias
    assert_close(adapter.logits_from_values(values), by_head, "logits_from_values uses the model's head")
    assert torch.allclose(by_head, by_embeddings) == tied, "an untied head differs from the embeddings"
    ids = torch.tensor([loaded.encode(PROMPT)])
    with torch.no_grad():
        assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, "reloaded logits")


@pytest.mark.parametrize("case_id", ["gpt2", "opt"])
def test_ffn_bias_is_part_of_the_coefficient(case_id, family_run):
    """The paper's FFN form: m_i = f(x·k_i + b_i), the bias included as in the authors' code."""
    from transformers.activations import ACT2FN

    run = family_run(_case(case_id))
    loaded, adapter = run.loaded, run.loaded.adapter
    act = ACT2FN[loaded.model.config.activation_function]
    tokens = run.examples.token_index()
    bias_effects = []
    for layer in range(adapter.n_layers):
        bias = adapter.up(layer).bias
        assert bias is not None and bias.abs().max() > 0
        top = run.examples.triggers.query(f"layer == {layer} and rank == 0").head(20)
        for row in top.itertuples():
            seen = {}
            handle = adapter.up(layer).register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
            ids = tokens[int(row.sentence_id)]
            try:
                with torch.no_grad():
                    loaded.model(input_ids=torch.tensor([ids]))
            finally:
                handle.remove()
            x = seen["x"].reshape(len(ids), -1)[row.position]
            with torch.no_grad():
                pre = x @ adapter.keys(layer)[row.memory]
                with_bias, without = act(pre + bias[row.memory]), act(pre)
            assert float(with_bias) == pytest.approx(row.coefficient, rel=1e-4, abs=1e-6)
            bias_effects.append(abs(float(with_bias - without)))
    assert max(bias_effects) > 1e-3, "the bias must matter: without it the coefficients differ"


def test_a_folder_with_safetensors_in_several_shards(smollm, tmp_path):
    case = _case("llama")
    torch.manual_seed(0)
    model = case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=512)).float().eval()
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    smollm.tokenizer.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([loaded.encode(PROMPT)])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    for layer in range(loaded.adapter.n_layers):
        assert torch.equal(loaded.adapter.values(layer), model.model.layers[layer].mlp.down_proj.weight.T)


def test_models_the_library_cannot_read_get_an_error_naming_the_folder(smollm, tmp_path, monkeypatch):
    import dataclasses

    import transformers as tf

    from ffnlib import ModelNotFoundError, UnsupportedModelError
    from ffnlib import adapters

    bert = tmp_path / "an-encoder"
    tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    with pytest.raises(UnsupportedModelError, match="encoder") as error:
        load_model(str(bert))
    assert str(bert) in str(error.value)

    no_tokenizer = tmp_path / "no-tokenizer"
    case = _case("llama")
    case.model_cls(build_config(case)).save_pretrained(no_tokenizer)
    with pytest.raises(ModelNotFoundError, match="no tokenizer") as error:
        load_model(str(no_tokenizer))
    assert str(no_tokenizer) in str(error.value) and "tokenizer.save_pretrained" in str(error.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json") as error:
        load_model(str(empty))
    assert str(empty) in str(error.value)

    no_ffn = tmp_path / "no-ffn"
    case.model_cls(build_config(case)).save_pretrained(no_ffn)
    smollm.tokenizer.save_pretrained(no_ffn)
    llama = next(family for family in adapters.FAMILIES if family.name == "llama")
    moved = tuple(dataclasses.replace(f, down="mlp.experts_down") if f is llama else f for f in adapters.FAMILIES)
    monkeypatch.setattr(adapters, "FAMILIES", moved)  # as if the FFN were not where the family keeps it
    with pytest.raises(UnsupportedModelError) as error:
        load_model(str(no_ffn))
    message = str(error.value)
    assert str(no_ffn) in message and "mlp.experts_down" in message and "has no 'experts_down'" in message
