"""async_poll: reading a background restore's async results file and progress record (restore_progress_info)."""
import json

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import async_poll


def test_the_wrappers_record_is_a_running_job():
    assert async_poll.job_state(json.dumps({"started": True, "finished": False, "ansible_job_id": "1.2"})) == (False, None)
    assert async_poll.job_state("") == (False, None)  # not written yet
    assert async_poll.job_state('{"started": true, "fin') == (False, None)


def test_the_modules_result_is_a_finished_job():
    result = {"changed": True, "documents": 3, "invocation": {"module_args": {}}}
    assert async_poll.job_state(json.dumps(result)) == (True, result)
    assert async_poll.job_state(json.dumps({"started": True, "finished": True, "rc": 0}))[0] is True
    finished, data = async_poll.job_state("[1, 2]")
    assert finished and data["failed"] and "not a JSON object" in data["msg"]


def test_outcome_drops_the_async_keys_and_returns_the_warnings():
    data = {"started": 1, "finished": 1, "ansible_job_id": "1.2", "results_file": "/x", "invocation": {"module_args": {"a": 1}},
            "changed": True, "documents": 3, "deprecations": [],
            "warnings": ["w1", {"msg": "w2"}, {"event": {"msg": "w3"}, "__ansible_type": "WarningSummary"}]}
    result, warnings = async_poll.outcome(data)
    assert result == {"changed": True, "documents": 3} and warnings == ["w1", "w2", "w3"]


def test_progress_line_or_starting():
    assert async_poll.progress_line(json.dumps({"line": "restore of snapshot s: 50.0 %", "seq": 2})) == "restore of snapshot s: 50.0 %"
    for text in (None, "", "{", "[]", json.dumps({"seq": 1})):
        assert async_poll.progress_line(text) == async_poll.STARTING
