"""Offline language identification (py3langid: the langid.py naive-Bayes model ships in the
package, nothing is downloaded). The model loads once per process; long documents are
classified on a bounded prefix, which is as accurate for whole-page language and much faster."""

from __future__ import annotations

from functools import lru_cache

PREFIX_CHARS = 2000


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability in [0, 1]) of the text's language."""
    lang, prob = _identifier().classify(text[:PREFIX_CHARS])
    return lang, float(prob)
