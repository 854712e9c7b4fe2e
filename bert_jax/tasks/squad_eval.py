"""SQuAD's official evaluation (the v1.1 and v2.0 scripts' rules): answers normalised
(case, punctuation, articles, whitespace), exact match and token F1 against the best gold
answer, HasAns/NoAns scores, and v2.0's search for the best no-answer threshold."""

import collections
import re
import string
from collections.abc import Mapping, Sequence


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def exact_match(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(gold: str, prediction: str) -> float:
    gold_tokens = normalize_answer(gold).split()
    predicted = normalize_answer(prediction).split()
    if not gold_tokens or not predicted:  # a no-answer matches only a no-answer
        return float(gold_tokens == predicted)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(predicted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def evaluate(
    examples: Sequence,  # squad.Example: qas_id and answers
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The official scores (percentages): exact and f1 over every question; HasAns_* and
    NoAns_* where the set has unanswerable questions; with `null_odds`, the best exact and f1
    over no-answer thresholds and those thresholds (`best_thresholds`).

    Raises:
      ValueError when a question has no prediction.
    """
    missing = [e.qas_id for e in examples if e.qas_id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions, e.g. {missing[:3]}")
    exact, f1, has_answer = {}, {}, {}
    for e in examples:
        golds = [a.text for a in e.answers if normalize_answer(a.text)] or [""]
        prediction = predictions[e.qas_id]
        exact[e.qas_id] = max(exact_match(g, prediction) for g in golds)
        f1[e.qas_id] = max(f1_score(g, prediction) for g in golds)
        has_answer[e.qas_id] = golds != [""]
    ids = [e.qas_id for e in examples]
    out = _scores(exact, f1, ids)
    answered = [i for i in ids if has_answer[i]]
    unanswered = [i for i in ids if not has_answer[i]]
    if unanswered:
        for prefix, subset in (("HasAns", answered), ("NoAns", unanswered)):
            if subset:
                out.update({f"{prefix}_{k}": v for k, v in _scores(exact, f1, subset).items()})
    if null_odds is not None:
        out.update(best_thresholds(predictions, exact, f1, null_odds, has_answer))
    return out


def _scores(exact: Mapping[str, int], f1: Mapping[str, float], ids: Sequence[str]) -> dict:
    n = len(ids)
    return {
        "exact": 100.0 * sum(exact[i] for i in ids) / n,
        "f1": 100.0 * sum(f1[i] for i in ids) / n,
        "total": n,
    }


def best_thresholds(
    predictions: Mapping[str, str],
    exact: Mapping[str, int],
    f1: Mapping[str, float],
    null_odds: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> dict[str, float]:
    """The official script's search: answering no question whose null odds exceed a
    threshold, the threshold (one of the odds) that scores best, for exact and for f1.
    `predictions` are the best non-null spans."""
    out = {}
    for name, scores in (("exact", exact), ("f1", f1)):
        current = best = sum(1 for i in scores if not has_answer[i])
        threshold = 0.0
        for qas_id in sorted(null_odds, key=lambda i: null_odds[i]):
            if qas_id not in scores:
                continue
            if has_answer[qas_id]:
                current += scores[qas_id]
            else:
                current += -1 if predictions[qas_id] else 0
            if current > best:
                best, threshold = current, null_odds[qas_id]
        out[f"best_{name}"] = 100.0 * best / len(scores)
        out[f"best_{name}_thresh"] = threshold
    return out
