"""Test-wide settings, and which tests are end to end: those are marked `slow`, and `make test-fast` leaves them out.

A test is end to end when it starts a process (dlrt-run, torchrun, a script, a wheel build), runs an app (dlrt-run
in-process or a Hydra composition of its config, dlrt-tables, a dlrt-bench suite), reads real data or builds a
torchvision net: what a user does, at its cost (a Hydra composition alone takes a second). The fast lane keeps the
unit tests of the method and of the harness's parts. A new end-to-end test goes into one of the lists below.
"""

import pytest
import torch

# One thread: MKL's LAPACK with two threads on a two-core machine stalls badly whenever another process
# is busy (a 500x500 SVD: 0.03 s alone, 6.7 s beside one busy process), and the tests gain little from two.
torch.set_num_threads(1)

# files whose every test is end to end
SLOW_FILES = {
    "test_wheel.py",  # builds and installs a wheel
    "test_distributed.py", "test_published_adaptive.py", "test_scripts.py", "test_layering.py",  # processes
    "test_cli.py", "test_run_names.py", "test_config_properties.py", "test_missing_runs.py",  # dlrt-run's config
    "test_protocols.py", "test_sweep_tables.py", "test_defaults.py", "test_unused_keys.py",
}
# fixtures that run something end to end once for the tests that read what it wrote
SLOW_FIXTURES = {
    "quick_run",  # test_bench: every bench suite, in a process
    "finished_run",  # test_robustness: a dlrt-run training
    "made",  # test_tables: dlrt-tables over a folder of runs, with its plots
    "mnist", "mnist_paper", "mnist_root", "image_root",  # real data, an image folder
}
# the other end-to-end tests, by file (names without their parameters)
SLOW_TESTS = {
    "test_published_defects.py": {"test_a_run_with_the_defects_trains_and_records"},
    "test_authors_setup.py": {"test_authors_baseline_needs_their_init_and_a_spectrum",
                              "test_train_test_split_has_no_validation_set_and_the_paper_splits_test_set"},
    "test_bench.py": {"test_python_m_dlrt_bench_runs_without_hydra",
                      "test_the_entry_point_imports_neither_hydra_nor_omegaconf",
                      "test_the_memory_suite_writes_dense_beside_each_method",
                      "test_basis_every_times_whole_cycles_and_measures_a_coefficient_step",
                      "test_the_profile_suite_times_then_profiles_a_small_timing_study",
                      "test_the_torchvision_suite_counts_and_times_resnet50",
                      "test_the_throughput_suite_counts_every_image_of_one_and_two_processes"},
    "test_cluster.py": {"test_two_nodes_over_loopback_train_one_run_folder_like_one_process",
                        "test_submitit_local_sweep_runs_jobs_apart_and_a_killed_job_resumes_when_resubmitted",
                        "test_the_slurm_launcher_differs_from_the_local_one_only_in_cluster_keys"},
    "test_convert.py": {"test_one_dlrt_step_of_the_paper_nets", "test_convert_then_merge_gives_the_same_outputs"},
    "test_export.py": {"test_a_converted_torchvision_model_rebuilds",
                       "test_what_could_not_be_loaded_is_refused_before_writing"},
    "test_graphs.py": {"test_a_failed_capture_is_recorded_once_in_the_timing_study",
                       "test_dlrt_run_with_cuda_graphs_trains_like_without",
                       "test_cuda_graphs_are_refused_where_they_cannot_work"},
    "test_optim.py": {"test_layerwise_by_default_only_for_large_factors_of_a_rank_changing_cpu_step"},
    "test_output_for_people.py": {"test_no_progress_bar_when_stderr_is_not_a_terminal",
                                  "test_a_progress_bar_on_a_terminal", "test_help_and_errors_point_to_the_list_of_keys",
                                  "test_the_bench_says_1_thread", "test_bench_output_that_cannot_be_written_is_one_line"},
    "test_robustness.py": {"test_an_interrupted_run_resumes_to_the_same_numbers",
                           "test_nan_in_the_data_marks_the_run_failed", "test_export_round_trip_in_both_formats",
                           "test_missing_data_roots_say_how_to_get_the_data",
                           "test_a_corrupt_checkpoint_is_reported_not_trained_over",
                           "test_export_rebuilds_an_image_folder_net_of_any_class_count",
                           "test_a_run_resumed_where_its_fine_tuning_begins_ends_as_an_uninterrupted_one",
                           "test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint",
                           "test_out_dir_empty_is_refused_and_nothing_goes_to_the_root",
                           "test_a_factorisation_that_fails_in_training_is_a_failed_run_in_one_line"},
    "test_sharding.py": {"test_two_workers_train_a_batchnorm_resnet_on_an_image_folder_as_one_process",
                         "test_two_workers_train_lenet5_on_mnist_as_one_process"},
    "test_tables.py": {"test_fc_authors_procedure_beside_ours", "test_experiments_option_and_unfinished_note",
                       "test_runs_of_different_settings_are_not_averaged_together", "test_empty_runs_folder",
                       "test_authors_init_runs_make_rows_of_their_own",
                       "test_archived_rows_fill_rows_without_runs_and_are_marked",
                       "test_archived_fc_rows_are_min_val_loss_rows_and_fill_the_protocol_column_at_their_final_epoch",
                       "test_unreadable_run_folders_are_named_and_skipped",
                       "test_without_out_it_writes_beside_not_over_the_committed_results",
                       "test_the_authors_setup_is_compared_with_the_papers_first_epochs",
                       "test_two_folders_of_the_same_run_count_once",
                       "test_the_basis_every_study_has_a_table_of_its_own_beside_k_1"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        if (file in SLOW_FILES or item.originalname in SLOW_TESTS.get(file, ())
                or SLOW_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.slow)
