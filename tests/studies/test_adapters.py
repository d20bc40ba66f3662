"""The study adapters' record of how a trainer run was computed."""

from __future__ import annotations

from budgetsearch.studies.adapters import name_mixed_configurations

AVX2, AVX512 = "aten=AVX2 onednn=AVX2 cpu=avx512", "aten=AVX512 onednn=auto cpu=avx512"


def _doc(*configs) -> dict:
    epochs = [{"epoch": i + 1, **({"threads": t, "kernels": k} if k else {})}
              for i, (t, k) in enumerate(configs)]
    return {"threads": 1, "kernels": AVX2, "epochs": epochs}


def test_a_run_resumed_under_other_threads_and_kernels_names_every_one() -> None:
    doc = _doc((1, AVX2), (2, AVX2), (10, AVX512))
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == ("1;2;10", f"{AVX2};{AVX512}")


def test_the_epochs_not_the_last_process_say_how_a_run_trained() -> None:
    doc = _doc((2, AVX512), (2, AVX512))  # resumed, with nothing left to train, at 1 on AVX2
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == (2, AVX512)


def test_epochs_recorded_before_the_fields_were_kept_are_skipped() -> None:
    doc = _doc((None, None), (2, AVX512))
    name_mixed_configurations(doc)
    assert (doc["threads"], doc["kernels"]) == (2, AVX512)
    old = _doc((None, None), (None, None))
    name_mixed_configurations(old)
    assert (old["threads"], old["kernels"]) == (1, AVX2)
