"""Scoring models on a labelled target set (:mod:`.evaluate`), the HTML report (:mod:`.report`), the test-time
adaptation baselines (:mod:`.baselines`) and the label-free review list (:mod:`.triage`)."""
