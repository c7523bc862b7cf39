"""Tools the model may call during an episode: call formats (:mod:`.formats`) and the
sandboxed ``python`` tool (:mod:`.python`)."""
