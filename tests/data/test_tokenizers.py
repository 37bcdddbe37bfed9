"""Both tokenizer backends through one interface (data/tokenizers.py); nothing is downloaded."""
import pytest
from hypothesis import given, settings, strategies as st

from data.arithmetic import generate_problems, tokenizer_corpus
from data.formats import PAD, SPECIAL_TOKENS, prompt_text, response_text
from data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def corpus():
    return tokenizer_corpus(generate_problems(21, 300))


@pytest.fixture(scope="module")
def sp(corpus):
    return train_sentencepiece(corpus, vocab_size=768)


@pytest.fixture(scope="module")
def hf(corpus, tmp_path_factory):
    """A tiny Qwen-like tokenizer.json: byte-level BPE, single digits, Qwen's added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus, trainer=trainer)
    raw.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    raw.save(str(path))
    return load_tokenizer(path)


@pytest.fixture(params=["sp", "hf"])
def tok(request):
    return request.getfixturevalue(request.param)


TRICKY = ["", "a", " leading space", "two  spaces\n\n\nthree newlines\n", "tab\tand\r\n",
          "café 漢字 ☃ 12345", "<think>\n1+2=3\n</think>", "x<COMP_20><COMP_POLICY>[SEP]y",
          "<|endoftext|><|endoftext|>", "\\boxed{42}<|im_end|>\n"]


def test_backends_share_the_interface(sp, hf):
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(hf, HFTokenizer)
    for t in (sp, hf):
        assert t.pad_id == t.token_to_id(PAD) and t.eos_id == t.token_to_id("<|im_end|>")
        assert set(t.special_ids) == set(SPECIAL_TOKENS)
        assert sorted(t.control_ids) == [20, 40, 60, 80, 100]
    assert sp.pad_id == 0


def test_special_tokens_are_single_ids_also_inside_text(tok):
    ids = set()
    for token in SPECIAL_TOKENS:
        tid = tok.token_to_id(token)
        ids.add(tid)
        assert tok.encode(token) == [tid]
        assert tok.id_to_token(tid) == token
        assert tok.decode([tid]) == token
        inner = tok.encode("ab " + token + "12")
        assert inner.count(tid) == 1 and tok.decode(inner) == "ab " + token + "12"
    assert len(ids) == len(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_generated_chat_text(tok):
    for i, p in enumerate(generate_problems(22, 30)):
        text = prompt_text(p.question, control=(None, 20, "policy")[i % 3]) + \
            response_text(p.cot, p.answer_text, level=(None, 100)[i % 2])
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS + ("\n", " ", "  ", "=", "*")),
                          st.text(alphabet="ab Zé漢09+\n\t{}\\", max_size=8)), max_size=12))
def test_round_trip_random_text(sp, hf, pieces):
    text = "".join(pieces)
    for t in (sp, hf):
        assert t.decode(t.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY + ["Mia has 14 boxes.\n14*23=322\nSo now\n"])
def test_offsets_tile_the_text(tok, text):
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(offsets) == len(ids)
    distinct = [o for k, o in enumerate(offsets) if k == 0 or o != offsets[k - 1]]
    if text:
        assert distinct[0][0] == 0 and distinct[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(distinct, distinct[1:]):
        assert s0 < e0 == s1 < e1


def test_digits_are_split(sp, hf):
    for t in (sp, hf):
        digits = [t.id_to_token(i) for i in t.encode("12345")]
        assert len(digits) == 5


def test_unknown_token_and_bad_id_errors_name_them(tok):
    with pytest.raises(KeyError, match="<COMP_30>"):
        tok.token_to_id("<COMP_30>")
    with pytest.raises(IndexError, match=str(tok.vocab_size + 7)):
        tok.id_to_token(tok.vocab_size + 7)
    with pytest.raises(IndexError, match="-1"):
        tok.decode([-1])


def test_sentencepiece_training_is_deterministic(corpus):
    a = train_sentencepiece(corpus[:150], vocab_size=600)
    b = train_sentencepiece(list(corpus[:150]), vocab_size=600)
    c = train_sentencepiece(corpus[150:], vocab_size=600)
    assert a.model_proto == b.model_proto
    assert a.model_proto != c.model_proto


def test_sentencepiece_arguments_are_validated(corpus):
    with pytest.raises(ValueError, match="100"):
        train_sentencepiece(corpus, vocab_size=100)
    with pytest.raises(ValueError, match="wordpiece"):
        train_sentencepiece(corpus, model_type="wordpiece")
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["<think>\n</think>"])


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / ("tok.json" if isinstance(tok, HFTokenizer) else "tok.model")
    tok.save(path)
    again = load_tokenizer(path)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    text = "".join(TRICKY)
    assert again.encode(text) == tok.encode(text)
    assert again.special_ids == tok.special_ids


def test_hf_keeps_existing_added_tokens(hf):
    # <think> and </think> came with the file (ids 500, 501); the rest were appended.
    assert hf.token_to_id("<think>") == 500 and hf.token_to_id("</think>") == 501
    assert hf.token_to_id("<|endoftext|>") == 0
    assert sorted(hf.control_ids.values()) == list(range(502, 507))
    assert hf.vocab_size == 509


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
