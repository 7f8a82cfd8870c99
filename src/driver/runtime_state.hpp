// Runtime state of mounted layers, kept in the run directory (a tmpfs such as /run/layerd) so a
// restarted layerd adopts the FUSE servers that outlived it, with their refcounts. One small JSON
// file per mounted layer, replaced atomically (write a temporary file, then rename) on every
// change: a crash leaves either the old or the new record, never a torn one.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "layerd/core/task.hpp"

namespace layerd::driver {

struct RuntimeRecord {
  std::string home;
  std::string id;
  int refcount = 0;
  std::string options;
  pid_t server_pid = 0;
  long long server_start_time = 0;  // /proc/PID/stat field 22: guards against PID reuse
};

class RuntimeState {
 public:
  explicit RuntimeState(std::string run_dir);
  core::Task<void> open();
  core::Task<void> save(const RuntimeRecord& record);
  core::Task<void> erase(const std::string& home, const std::string& id);
  // Every readable record; unreadable ones (torn by a crash of an older version) are dropped.
  core::Task<std::vector<RuntimeRecord>> load_all();
  // The home the last Init chose ("" if none was recorded): dockerd sends Init only when it
  // starts, so a restarted layerd must find its way back to that home by itself.
  core::Task<void> save_home(const std::string& home);
  core::Task<std::string> load_home();

 private:
  std::string file_for(const std::string& home, const std::string& id) const;
  core::Task<void> replace_file(const std::string& target, const std::string& name,
                                const std::string& text);
  std::string dir_;
  std::string home_file_;
  std::uint64_t temp_counter_ = 0;
};

}  // namespace layerd::driver
