#include "runtime_state.hpp"

#include <dirent.h>
#include <fcntl.h>

#include <cerrno>
#include <nlohmann/json.hpp>

#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"
#include "layerd/sys/syscalls.hpp"

namespace layerd::driver {

namespace {

// FNV-1a: a stable name for a home in file names (std::hash may change between builds).
std::string home_tag(const std::string& home) {
  std::uint64_t hash = 1469598103934665603ULL;
  for (unsigned char c : home) {
    hash ^= c;
    hash *= 1099511628211ULL;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(hash));
  return buf;
}

constexpr const char* kSuffix = ".json";

}  // namespace

RuntimeState::RuntimeState(std::string run_dir)
    : dir_(run_dir + "/mounts"), home_file_(std::move(run_dir) + "/home") {}

core::Task<void> RuntimeState::open() {
  int res = co_await core::mkdirat(AT_FDCWD, dir_.c_str(), 0700);
  if (res < 0 && res != -EEXIST) throw Error(res, "creating the runtime state directory " + dir_);
  // Temporary files of a write interrupted by a crash.
  std::vector<std::string> temps = co_await core::offload([dir = dir_] {
    std::vector<std::string> found;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (dirent* e = ::readdir(d))
        if (e->d_name[0] == '.' && std::string(e->d_name).rfind(".tmp-", 0) == 0)
          found.push_back(dir + "/" + e->d_name);
      ::closedir(d);
    }
    return found;
  });
  for (const auto& temp : temps) (void)co_await core::unlinkat(AT_FDCWD, temp.c_str(), 0);
}

std::string RuntimeState::file_for(const std::string& home, const std::string& id) const {
  return dir_ + "/" + home_tag(home) + "-" + id + kSuffix;
}

core::Task<void> RuntimeState::save(const RuntimeRecord& record) {
  nlohmann::json doc = {{"home", record.home},
                        {"id", record.id},
                        {"refcount", record.refcount},
                        {"options", record.options},
                        {"server_pid", record.server_pid},
                        {"server_start_time", record.server_start_time}};
  co_await replace_file(file_for(record.home, record.id), record.id, doc.dump() + "\n");
}

core::Task<void> RuntimeState::replace_file(const std::string& target, const std::string& name,
                                            const std::string& text) {
  const std::string temp = dir_ + "/.tmp-" + std::to_string(++temp_counter_) + "-" + name;
  int fd = co_await core::openat(AT_FDCWD, temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) throw Error(fd, "writing runtime state " + temp);
  sys::UniqueFd file(fd);
  int written = co_await core::write(file.get(), text.data(), static_cast<unsigned>(text.size()), 0);
  file.reset();
  if (written != static_cast<int>(text.size())) {
    (void)co_await core::unlinkat(AT_FDCWD, temp.c_str(), 0);
    throw Error(written < 0 ? written : -EIO, "writing runtime state " + temp);
  }
  int res = co_await core::renameat(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str());
  if (res < 0) {
    (void)co_await core::unlinkat(AT_FDCWD, temp.c_str(), 0);
    throw Error(res, "replacing runtime state " + target);
  }
}

core::Task<void> RuntimeState::save_home(const std::string& home) {
  co_await replace_file(home_file_, "home", home + "\n");
}

core::Task<std::string> RuntimeState::load_home() {
  co_return co_await core::offload([file = home_file_] {
    std::string text;
    if (sys::read_small_file(AT_FDCWD, file.c_str(), text, 1 << 16) < 0) return std::string();
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return text;
  });
}

core::Task<void> RuntimeState::erase(const std::string& home, const std::string& id) {
  const std::string target = file_for(home, id);
  int res = co_await core::unlinkat(AT_FDCWD, target.c_str(), 0);
  if (res < 0 && res != -ENOENT) throw Error(res, "removing runtime state " + target);
}

core::Task<std::vector<RuntimeRecord>> RuntimeState::load_all() {
  co_return co_await core::offload([dir = dir_] {
    std::vector<RuntimeRecord> records;
    DIR* d = ::opendir(dir.c_str());
    if (!d) return records;
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name.empty() || name[0] == '.' || name.size() < 6 ||
          name.compare(name.size() - 5, 5, kSuffix) != 0)
        continue;
      std::string text;
      if (sys::read_small_file(AT_FDCWD, (dir + "/" + name).c_str(), text, 1 << 20) < 0) continue;
      try {
        auto doc = nlohmann::json::parse(text);
        RuntimeRecord r;
        r.home = doc.at("home").get<std::string>();
        r.id = doc.at("id").get<std::string>();
        r.refcount = doc.at("refcount").get<int>();
        r.options = doc.at("options").get<std::string>();
        r.server_pid = doc.at("server_pid").get<pid_t>();
        r.server_start_time = doc.at("server_start_time").get<long long>();
        records.push_back(std::move(r));
      } catch (const std::exception&) {
        // A record this version cannot read: ignored; the mount-table sweep at start still
        // unmounts whatever it described.
      }
    }
    ::closedir(d);
    return records;
  });
}

}  // namespace layerd::driver
