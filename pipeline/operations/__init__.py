"""Operations that read across stages: reconciliation of every reading, re-submitting refused readings."""
