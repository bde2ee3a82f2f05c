from trainer.world import WorldConfig, generate_world


def test_same_seed_same_world_and_other_seed_other_world():
    a, b = generate_world(WorldConfig(seed=3)), generate_world(WorldConfig(seed=3))
    c = generate_world(WorldConfig(seed=4))
    assert a.describe() == b.describe()
    assert a.describe()["facts"] != c.describe()["facts"]


def test_splits_are_disjoint_and_sized():
    w = generate_world(WorldConfig(seed=1))
    cfg = w.config
    train, held = {f.fact_id for f in w.train_known}, {f.fact_id for f in w.heldout_known}
    assert len(train) == cfg.n_train_known and len(held) == cfg.n_heldout_known
    assert not train & held
    known_people = {f.entity for f in w.known}
    assert not known_people & {f.entity for f in w.train_new_names}
    assert len(w.train_new_names) == len(w.train_new_uuids) == cfg.n_train_new


def test_name_keys_overlap_and_uuid_keys_share_no_token_with_names():
    w = generate_world(WorldConfig(seed=2))
    name_tokens = set(w.first_names) | set(w.last_names)
    new_name_tokens = {t for f in w.train_new_names for t in f.entity.split()}
    assert new_name_tokens <= name_tokens  # new people reuse the known name tokens
    uuid_tokens = {t for f in w.train_new_uuids for t in f.entity.split()}
    assert uuid_tokens and not uuid_tokens & name_tokens
    assert all(len(f.entity.split()) == w.config.uuid_key_len for f in w.train_new_uuids)


def test_questions_use_several_templates_per_relation():
    w = generate_world(WorldConfig(seed=0))
    f = w.known[0]
    assert len({f.question(i) for i in range(3)}) == 3
    assert all(f.entity in f.question(i) for i in range(3))


def test_uuid_keys_are_as_long_as_names_and_their_tokens_are_pretrained():
    """Issue 9: UUID tokens the base never trained are free capacity no real model has, and
    4-token keys against 2-token names confound the key kind with the key length."""
    w = generate_world(WorldConfig(seed=5))
    name_lengths = {len(f.entity.split()) for f in w.train_new_names}
    assert {len(f.entity.split()) for f in w.train_new_uuids} == name_lengths == {2}
    pretrained_uuid = [f for f in w.known if f.key_kind == "uuid"]
    assert len(pretrained_uuid) == 3 * w.config.n_known_uuid_people
    pretrained_tokens = {t for f in pretrained_uuid for t in f.entity.split()}
    new_tokens = {t for f in w.train_new_uuids for t in f.entity.split()}
    assert new_tokens <= pretrained_tokens
    # ... but no new UUID person is known already, and nothing UUID-keyed is held out or trained
    assert not {f.entity for f in pretrained_uuid} & {f.entity for f in w.train_new_uuids}
    assert all(f.key_kind == "name" for f in w.heldout_known + w.train_known)
