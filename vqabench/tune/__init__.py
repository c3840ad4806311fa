"""`vqabench tune`: every selected preset tuned with Optuna on an equal budget of ordinary runs.

:mod:`.study` runs the studies (trials through the runner, the best setting retrained and
scored on test once); :mod:`.summary` turns a session and its studies into the Tuned rows;
:mod:`.console` is the command's front end. Host side: no torch, no textual.
"""
