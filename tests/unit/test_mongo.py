"""mongo: one connection shape for a job's source and a restore target (no server needed: clients connect lazily)."""
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import mongo, restore

CONN = {"uri": "mongodb://127.0.0.1:1/?replicaSet=rs0", "tls": True, "tls_ca_file": "/ca.pem",
        "tls_certificate_key_file": "/client.pem", "username": "backup", "password": "pw", "auth_mechanism": "SCRAM-SHA-256",
        "auth_source": "admin", "connect_timeout": 3}


def test_client_options_from_a_connection_dict():
    kw = mongo.client_options(CONN)
    assert kw["tls"] is True and kw["tlsCAFile"] == "/ca.pem" and kw["tlsCertificateKeyFile"] == "/client.pem"
    assert kw["username"] == "backup" and kw["password"] == "pw"
    assert kw["authMechanism"] == "SCRAM-SHA-256" and kw["authSource"] == "admin"
    assert kw["connectTimeoutMS"] == kw["serverSelectionTimeoutMS"] == 3000


def test_tls_false_sets_no_tls_options():
    kw = mongo.client_options(dict(CONN, tls=False))
    assert not {"tls", "tlsCAFile", "tlsCertificateKeyFile"} & set(kw)


def test_restore_target_from_the_same_connection_dict():
    target = restore.MongoTarget.from_connection(dict(CONN, tls=False, connect_timeout=1))
    assert target.uri == CONN["uri"] and target.client_options == mongo.client_options(dict(CONN, tls=False, connect_timeout=1))
    try:
        assert target.client().options.pool_options.connect_timeout == 1.0
    finally:
        target.close()


def test_split_namespace_keeps_dots_in_the_collection():
    assert mongo.split_namespace("db.a..b.") == ("db", "a..b.")
