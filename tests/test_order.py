from fedpers.nn.order import ExecOrder, Life, assign, num_steps, touches


def test_three_layers_first_frozen():
    # NNTrainer numbering: forward 0..2, backward from the last layer; a frozen layer's three steps share one number.
    orders = assign([False, True, True])
    assert orders == [ExecOrder(0, 9, 9, 9), ExecOrder(1, 6, 7, 8), ExecOrder(2, 3, 4, 5)]
    assert num_steps(orders) == 10


def test_touches_from_flags():
    o = ExecOrder(1, 6, 7, 8)
    assert touches(Life.FORWARD, o) == (1,)
    assert touches(Life.CALC_GRAD | Life.APPLY_GRAD, o) == (6, 8)
    assert touches(Life.ITERATION, o) == (1, 6, 7, 8)
    assert touches(Life.NONE, o) == ()
    frozen = ExecOrder(0, 9, 9, 9)
    assert touches(Life.BACKWARD, frozen) == (9,)
