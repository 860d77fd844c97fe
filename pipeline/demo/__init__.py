"""`pipeline demo`: a synthetic world (`world`) run through every verb (`run`), resumable
(`state`), with the calibration and decontamination steps (`calibration`, `decontamination`)
and the HTML/JSON report (`report`). The top of the package: nothing below imports it."""
