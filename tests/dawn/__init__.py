"""The Dawn conformance harness of ``tests/test_dawn.py``: headless Chromium driven over
the DevTools protocol (:mod:`.driver`), the case matrix of exported WGSL programs
(:mod:`.cases`), and the page that runs them (``harness.html``, ``harness.js``) through
the browser example's own module, ``examples/web/qlinear.js``."""
