"""The compress stage's unit rules (experiments/extra_cot/compressed_data.py), with a fixed scorer."""
import numpy as np

from data.compression import CompressedCoT, sentence_units
from experiments.extra_cot.compressed_data import _whole_formulas_first, compressed_rows, equation_lines

#         0     1    2    3    4    5    6    7      8     9       10   11      12   13    14
PIECES = ["\n", "0", "4", "+", "5", "=", "9", " So", " I", " add", ".", " Yes", ":", " 1", "2"]
EQ = [0, 1, 2, 3, 1, 4, 5, 1, 6]            # "\n04+05=09": a line holding one equation
TEXT = [0, 7, 8, 9, 10]                      # "\n So I add."
CHECK = [0, 11, 12, 13, 3, 13, 5, 14, 10]    # "\n Yes: 1+1=2.": an equation inside a sentence
FILLER = [0] + [11] * 9                      # "\n Yes Yes ...", 10 tokens


def _text(ids):
    return [PIECES[i] for i in ids]


def test_equation_lines_are_lines_holding_one_equation():
    ids = EQ + TEXT + CHECK
    marks = equation_lines(_text(ids), sentence_units(_text(ids)))
    assert marks.tolist() == [1] * len(EQ) + [0] * (len(TEXT) + len(CHECK))


class _Scorer:
    """Keep scores by token id: the words of TEXT high, equations middling, filler low."""

    def padded(self, question_ids, cot_ids):
        width = max(len(c) for c in cot_ids)
        out = np.zeros((len(cot_ids), width), np.float32)
        for b, row in enumerate(cot_ids):
            out[b, :len(row)] = [0.9 if i in (7, 8, 9, 10) else 0.1 if i == 11 else 0.5
                                 for i in row]
        return out, np.array([len(c) for c in cot_ids])


def test_equations_go_first_and_level_20_gets_the_chain_that_keeps_them_all():
    row = EQ * 3 + TEXT + FILLER * 6          # 27 + 5 + 60 = 92 tokens
    rows = compressed_rows(_Scorer(), [[1]], [{"uid": "q", "cot_ids": row}],
                           (0.2, 0.3, 0.4, 0.6, 0.8, 1.0), pieces=PIECES)
    by_level = {r["level"]: r for r in rows}
    assert sorted(by_level) == [20, 40, 60, 80, 100]
    # 0.2 (18 tokens) keeps two equations, 0.3 (28) all three; both fall in [0.1, 0.3):
    # the whole one is filed, although 0.196 is nearer 0.2 than 27 / 92 = 0.293
    assert by_level[20]["cot_ids"] == EQ * 3 and by_level[20]["ratio"] == 27 / 92
    # with room for text, the equations are still there
    assert by_level[40]["cot_ids"] == EQ * 3 + TEXT


def test_whole_formulas_first_drops_a_sample_only_for_a_whole_one_in_its_window():
    source = EQ * 2 + TEXT
    units = {"q": sentence_units(_text(source))}
    priority = {"q": equation_lines(_text(source), units["q"])}
    lost = CompressedCoT("q", 0.2, tuple(EQ + TEXT), 80)       # 14 / 80 = 0.175: level 20
    whole = CompressedCoT("q", 0.25, tuple(EQ * 2), 80)        # 18 / 80 = 0.225: level 20
    assert lost.level == whole.level == 20
    assert _whole_formulas_first([lost, whole], priority, units, PIECES) == [whole]
    assert _whole_formulas_first([lost], priority, units, PIECES) == [lost]   # nothing better
