"""MONAI Label's own client against the RAU-Ray app; run by tests/integration/test_monailabel.py in .venv-monailabel.

Runs in its own virtual environment (``make monailabel-client``: monailabel 0.8.5 without its dependencies, plus
requests), so it imports nothing of this project. It calls ``monailabel.client.MONAILabelClient`` unchanged, as 3D
Slicer's MONAI Label module does (info, upload, datastore, infer, sessions), and prints one JSON object with what
the server answered; the test asserts on it and reads the label files it saved.
Use: ``.venv-monailabel/bin/python tests/integration/monailabel_client_script.py URL IMAGE.nii.gz WORKDIR SPEC``
(SPEC: JSON {"slice": k, "structures": [...], "click": [i, j, k]}; with API keys on also "username" (the key's
name) and "password" (its secret), and "infer": false to skip inference).
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)  # monailabel.client imports cgi (3.11: deprecated)

from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402


def failure(call) -> dict:
    """The client's exception for a call that must fail: its HTTP status and message."""
    try:
        call()
    except MONAILabelClientException as e:
        return {"status": e.status_code, "msg": e.msg}
    return {"status": None, "msg": "no error"}


def main(url: str, image: str, workdir: str, spec: dict) -> dict:
    client = MONAILabelClient(url, tmpdir=workdir)
    out = {}
    if spec.get("username"):  # API keys on: log in as 3D Slicer's module does (auth_enabled, auth_token, update_auth)
        out["without_token"] = failure(lambda: client.info())
        out["auth_enabled"] = client.auth_enabled()
        out["bad_login"] = failure(lambda: client.auth_token(spec["username"], "not-the-secret"))
        token = client.auth_token(spec["username"], spec["password"])
        out["token_type"] = token["token_type"]  # the token itself is not printed
        client.update_auth(token)
        out["token_valid"] = client.auth_valid_token()
    out["info"] = client.info()
    if spec.get("infer") is False:  # the calls without inference: upload, datastore, a session opened and closed
        out["upload"] = client.upload_image(image, image_id="phantom")
        out["datastore"] = client.datastore()
        sid = client.create_session(image)["session_id"]
        out["get_session"] = client.get_session(sid)
        out["removed"] = client.remove_session(sid)
        return out
    out["upload"] = client.upload_image(image, image_id="phantom")
    out["datastore"] = client.datastore()
    seg_file, seg_params = client.infer("rau_segmentation", "phantom",
                                        {"structures": spec["structures"], "slice": spec["slice"]})
    out["segment"] = {"file": seg_file, "params": seg_params}
    session = client.create_session(image)
    sid = session["session_id"]
    out["session"] = session
    out["get_session"] = client.get_session(sid)
    click_file, click_params = client.infer("sam2_interactive", "phantom",
                                            {"foreground": [spec["click"]], "background": [], "label": "liver",
                                             "slice": spec["click"][2]}, session_id=sid)
    out["clicks"] = {"file": click_file, "params": click_params}
    out["removed"] = client.remove_session(sid)
    out["after_remove"] = failure(lambda: client.get_session(sid))
    out["unknown_model"] = failure(lambda: client.infer("deepedit_spleen", "phantom", {}))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
