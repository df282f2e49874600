"""Gradient paths beyond the paper's, one file each (registered on import; the registry
imports them when a name is first looked up): ``hart`` (:mod:`.hart`), ``pdsg``
(:mod:`.pdsg`), with the unrolled-recurrence machinery they share (:mod:`.unrolled`)."""
