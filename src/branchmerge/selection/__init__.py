"""Model selection (`branchmerge select`): measure candidates for accuracy and memory with
lm-evaluation-harness, choose the set and compress rate that fit a memory budget, write the merge and
router configs and a report (:mod:`.config` → :mod:`.tasks` → :mod:`.choose` (pure) → :mod:`.run` →
:mod:`.report`)."""
