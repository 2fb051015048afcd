"""Every speed change applied after the plain build, in one ordered place (:func:`apply`)."""
