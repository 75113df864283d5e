"""Released RAM / RAM++ / Tag2Text checkpoints in ramflow: the official network layout
(:mod:`.model`), the key mapping (:mod:`.layout`), the shipped tag sets (:mod:`.resources`) and
``ramflow import-official`` (:mod:`.importer`, :mod:`.cli`)."""
