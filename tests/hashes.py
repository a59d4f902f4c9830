"""
Fixed htpasswd hashes for the authentication tests, each made once by the tool named above
it (so running the tests needs none of them), shared by every test module that logs in.
"""

from __future__ import annotations

# htpasswd -nbB alice alice-secret
BCRYPT_2Y = "$2y$05$26EIN94ajhXZWY5zgtHlGuoXJIdhj2Ixe0LGZgMrIzLVIvKfydrV."
# mkpasswd -m bcrypt niaj-secret
BCRYPT_2B = "$2b$05$973L9qs4kv7hcL1.K.Hfruj.P7vCHGurnxIEGrt0HbuSltTKEYwre"
# mkpasswd -m bcrypt-a mallory-secret
BCRYPT_2A = "$2a$05$ZkLZGdiPar79DsPzyiL4eu672topsqG4WOJzjuLKHElvp/fRLUJkC"
# htpasswd -nbB long <"p" * 80>
BCRYPT_LONG = "$2y$05$H13X0IjQ1PsIukH/mrtOfuuAvjBgNEU4p1.WOmq5jvi.y5Kf/POTS"
# htpasswd -nbm carol 'carol pässword' (UTF-8 terminal)
APR1 = "$apr1$8oyZKRYX$KaYss0.LI5O.FIXCBPieH/"
# htpasswd -nbm empty ''
APR1_EMPTY = "$apr1$uxFI0Swp$eGANKFxloffKieYfh4DBp0"
# mkpasswd -m md5 judy-secret
MD5_CRYPT = "$1$58wDpiay$EMPcu9Hqg0.4b.6qMet6R."
# htpasswd -nbs erin erin-secret
SHA1 = "{SHA}ItvNMFPtjBMaa6UFiWT3tF4qy1Y="
# mkpasswd -m sha-256 frank-secret
SHA256 = "$5$/v3pT.gY7MhhiRhG$ygr./4JQlGIiEp4zw1mZrgGzrG.c.ftXYXomNNd8E2/"
# mkpasswd -m sha-256 -R 1000 ivan-secret
SHA256_ROUNDS = "$5$rounds=1000$wvDhCpESSemAijEB$isQwhN4hBaxGWgv9kE1L6UbtJ0l3yAIVm77bRtwAdp0"
# mkpasswd -m sha-512 grace-secret
SHA512 = (
    "$6$FNghY5thjue3LHKL$Ujx3Mxe4ksIU2UQk2oeH3E26k16Z1UGQAmxa4oE0WnNLHAFccCx5uXjNpiudgBDi2qAf5"
    "uuUs/bzWYkUujOlJ."
)
# mkpasswd -m sha-512 -R 10000 heidi-secret
SHA512_ROUNDS = (
    "$6$rounds=10000$se7aqM7gflCzCSeJ$FiwT3BrrwrGtmMeni.XNP3xPhM5WctrgyLNXqZ.DETjza9vpmIKQVR7"
    ".EQD6CgHevxOe0P0kYLH.qPF65WWUo/"
)
