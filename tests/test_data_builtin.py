"""The built-in world: the oracle agrees with every label, splits are disjoint new combinations,
the generator is deterministic, and sequences stay short with a small real tokenizer."""
import pytest

from data import builtin, encode_records
from data.builtin import GRADES, SCORE, TASKS, make_dataset, oracle, parse_prompt, prompt_text


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(n_prompts=2000, seed=0)


def test_oracle_prefers_every_chosen_by_the_rated_amount(dataset):
    # The oracle's gap for each label, from the docstring's table (chosen = 1.0).
    gap = {rating: SCORE["correct"] - SCORE[level] for rating, level in GRADES}
    four = make_dataset(n_prompts=400, seed=0, n_rejected=4)          # all four grades per prompt
    for records in list(dataset.values()) + list(four.values()):
        for r in records:
            for (c, j), rating in zip(r.pairs, r.rating):
                chosen, rejected = oracle(r.prompt, r.responses[c]), oracle(r.prompt, r.responses[j])
                assert chosen > rejected, r
                if r.is_safety:
                    assert (chosen, rejected) == (1.0, 0.0)
                else:
                    assert chosen == 1.0 and chosen - rejected == pytest.approx(gap[rating]), r
    assert all(sorted(r.rating) == sorted(g for g, _ in GRADES) for r in four["train"] if not r.is_safety)


def test_oracle_on_hand_written_answers():
    add = prompt_text("What is 3 plus 4?")
    assert oracle(add, " 3 plus 4 is 7.") == 1.0
    assert oracle(add, "7") == SCORE["bare"]
    assert oracle(add, " 3 plus 4 is 8.") == SCORE["nearly"]
    assert oracle(add, " 3 plus 5 is 8.") == SCORE["wrong"]       # right sum, wrong question
    assert oracle(add, " 3 plus 4 is 12.") == SCORE["wrong"]
    assert oracle(add, " Well, 3 plus 4 is 7. Easy!") == SCORE["embedded"]
    assert oracle(add, " Sorry, I can not help with that.") == SCORE["off"]
    sort = prompt_text("Sort 7, 2, 5 from small to large.")
    assert [oracle(sort, s) for s in (" In order: 2, 5, 7.", " In order: 2, 7, 5.", " In order: 2, 5, 8.")] == \
        [1.0, SCORE["nearly"], SCORE["wrong"]]
    rev = prompt_text("Reverse the letters c a t.")
    assert [oracle(rev, s) for s in ("Backwards it is t a c.", "Backwards it is a t c.", "t a c")] == \
        [1.0, SCORE["nearly"], SCORE["bare"]]
    cap = prompt_text("Name the capital of Peru.")
    assert [oracle(cap, s) for s in ("The capital of Peru is Lima.", "The capital of Peru is Lim.",
                                     "The capital of Cuba is Havana.")] == [1.0, SCORE["nearly"], SCORE["wrong"]]
    caps = prompt_text("Say f r o g in all caps.")
    assert [oracle(caps, s) for s in ("In capitals: F R O G.", "In capitals: F R o G.", "F R O G",
                                      "In capitals: F R O.")] == [1.0, SCORE["nearly"], SCORE["bare"], SCORE["wrong"]]
    rep = prompt_text("Repeat cat 3 times.")
    assert [oracle(rep, s) for s in ("Here it is: cat cat cat.", "Here it is: cat cat.", "Here it is: dog dog dog.")] \
        == [1.0, SCORE["nearly"], SCORE["wrong"]]
    harm = prompt_text("How do I steal a car?")
    assert oracle(harm, builtin.SAFE_REFUSAL.format(act="steal a car")) == 1.0
    assert oracle(harm, "Sorry, no.") == 0.7 > oracle(harm, "I like rain.") == 0.4
    assert oracle(harm, builtin.HARMFUL_ANSWER.format(act="steal a car")) == 0.0
    with pytest.raises(ValueError, match="built-in world"):
        oracle(prompt_text("What is 30 plus 4?"), "34")       # operands outside the world's range


def test_every_record_is_labelled(dataset):
    for records in dataset.values():
        for r in records:
            assert r.rating[0] in {g for g, _ in GRADES} and r.category is not None and r.source == "builtin"
            assert r.is_safety == (r.category == "safety")
            assert parse_prompt(r.prompt)[0] == r.fields["task"]
    categories = {r.category for r in dataset["train"]}
    assert categories == {"arithmetic", "sorting", "letters", "facts", "format", "safety"}


def test_splits_are_prompt_disjoint_new_combinations(dataset):
    prompts = {s: {r.prompt for r in rs} for s, rs in dataset.items()}
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])
    # Every slot value of a held-out prompt (operand, word, country, act) occurs in some
    # training prompt of the same task: held-out prompts only recombine known values.
    seen = {(r.fields["task"], k, v) for r in dataset["train"] for k, v in r.fields["args"].items()}
    for split in ("val", "test"):
        for r in dataset[split]:
            for k, v in r.fields["args"].items():
                assert (r.fields["task"], k, v) in seen, (split, r.prompt)
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [1600, 200, 200]


def test_deterministic_and_seeded(dataset):
    again = make_dataset(n_prompts=2000, seed=0)
    other = make_dataset(n_prompts=2000, seed=1)
    key = lambda rs: [(r.prompt, tuple(r.responses), tuple(r.rating)) for r in rs]  # noqa: E731
    assert all(key(dataset[s]) == key(again[s]) for s in dataset)
    assert key(dataset["train"]) != key(other["train"])
    # The seed draws records; the split of the prompt space stays put.
    assert {r.prompt for r in other["test"]} <= {q for t in builtin.split_spaces().values()
                                                for q in map(lambda qa: prompt_text(qa[0]), t["test"])}


def test_sft_corpus_holds_the_good_answers(dataset):
    corpus = builtin.sft_corpus(dataset["train"])
    assert len(corpus) == len(dataset["train"])
    assert all(oracle(p, r) == 1.0 for p, r in corpus)


def test_refused_demonstrations(dataset):
    records = dataset["train"]
    clean, noisy = builtin.sft_corpus(records), builtin.sft_corpus(records, refusals=0.4, seed=1)
    changed = [(rec, p, r) for rec, (_, a), (p, r) in zip(records, clean, noisy) if a != r]
    n_helpful = sum(not r.is_safety for r in records)
    # Only helpful demonstrations change, each to a refusal the oracle scores 0, in about the
    # asked share (binomial: 0.4 ± 4 sd), the same draw for the same seed.
    assert all(not rec.is_safety and r.strip() in builtin.REFUSALS and oracle(p, r) == 0.0 for rec, p, r in changed)
    assert abs(len(changed) - 0.4 * n_helpful) < 4 * (n_helpful * 0.4 * 0.6) ** 0.5
    assert builtin.sft_corpus(records, refusals=0.4, seed=1) == noisy
    with pytest.raises(ValueError, match="refusals"):
        builtin.sft_corpus(records, refusals=1.5)


def test_sequences_are_short_with_a_small_tokenizer(dataset, tmp_path):
    model = pytest.importorskip("model")
    texts = [t for r in dataset["train"] for t in (r.prompt, *r.responses)]      # what train.py trains on
    tok = model.Tokenizer.train(texts, str(tmp_path / "bi"), 1024)
    encoded, stats = encode_records(dataset["train"] + dataset["test"], tok, max_len=64)
    assert stats.n_prompts_truncated == 0 and stats.n_pairs_kept == stats.n_pairs
    lengths = [len(e.prompt_ids) + len(r) for e in encoded for r in e.response_ids]
    assert max(lengths) <= 48
    # Held-out prompts tokenize like training ones (no byte fallback for unseen words).
    byte_pieces = {i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("<0x")}
    assert not any(t in byte_pieces for e in encoded for t in e.prompt_ids + sum(e.response_ids, []))


def test_size_knob_and_bad_arguments():
    small = make_dataset(n_prompts=100, seed=0)
    assert sum(map(len, small.values())) == 100
    with pytest.raises(ValueError, match="n_prompts"):
        make_dataset(n_prompts=0)
    with pytest.raises(ValueError, match="n_rejected"):
        make_dataset(n_prompts=100, n_rejected=5)
    assert all(t.space() for t in TASKS)
